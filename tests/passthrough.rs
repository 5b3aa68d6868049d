//! `auth = "passthrough"` (issue 12, part 2): the caller's own credential
//! decides. The fake upstream runs Docker-style token auth (its `/token`
//! grants pull on private repositories only with the right Basic
//! credentials) and, with `set_strict_repos`, finds blobs and manifests by
//! digest only in the repositories they were pushed to, as distribution
//! does. Tokens are fetched by the tests from the fake's token service, as
//! docker, containerd, podman and skopeo do after the mirror relays the
//! upstream's challenge.

mod common;

use std::time::Duration;

use common::*;
use tempfile::TempDir;

const OWNER: (&str, &str) = ("owner", "s3cret-pw");

/// A token-auth upstream with `acme/private:v1` (private) and
/// `acme/public:v1`.
async fn registry() -> (FakeUpstream, Image, Image) {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    up.set_credentials(OWNER.0, OWNER.1);
    up.set_private("acme/private");
    up.set_strict_repos(true);
    let private = make_image(Format::Oci, &[3000, 70_000]);
    up.push_image("acme/private", "v1", &private);
    let public = make_image(Format::Oci, &[2000]);
    up.push_image("acme/public", "v1", &public);
    (up, private, public)
}

async fn start(up: &FakeUpstream, extra: &str) -> Stowage {
    start_stowage(&up.url(), &format!("auth = \"passthrough\"\n{extra}")).await
}

/// A token from the fake's token service for pulling `repo`, with the
/// owner's credentials or anonymously.
async fn token(up: &FakeUpstream, repo: &str, owner: bool) -> String {
    let mut r = client().get(format!(
        "{}/token?service=fake&scope=repository:{repo}:pull",
        up.url()
    ));
    if owner {
        r = r.basic_auth(OWNER.0, Some(OWNER.1));
    }
    let v: serde_json::Value = r.send().await.unwrap().json().await.unwrap();
    format!("Bearer {}", v["token"].as_str().unwrap())
}

/// What a request through stowage was answered.
struct Answer {
    status: u16,
    challenge: Option<String>,
    code: Option<String>,
    body: bytes::Bytes,
}

/// `method` of `/v2/<path>` on stowage with `auth` as `Authorization`.
async fn ask(st: &Stowage, method: &str, path: &str, auth: Option<&str>) -> Answer {
    let mut r = client().request(method.parse().unwrap(), st.v2(path));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = header(&r, "www-authenticate");
    let body = r.bytes().await.unwrap();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
    Answer {
        status,
        challenge,
        code,
        body,
    }
}

fn bearer(up: &FakeUpstream, scope: Option<&str>) -> String {
    let mut v = format!("Bearer realm=\"{}/token\",service=\"fake\"", up.url());
    if let Some(s) = scope {
        v.push_str(&format!(",scope=\"repository:{s}:pull\""));
    }
    v
}

#[tokio::test]
async fn unauthenticated_requests_get_the_upstreams_challenge() {
    let (up, _, _) = registry().await;
    let st = start(&up, "").await;
    // A manifest first (containerd does not ping): upstream's own 401,
    // its scope naming the repository as upstream does.
    let a = ask(&st, "GET", "acme/private/manifests/v1", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.code.as_deref(), Some("UNAUTHORIZED"));
    assert_eq!(a.challenge, Some(bearer(&up, Some("acme/private"))));
    // The ping dockerd, podman and skopeo send.
    let a = ask(&st, "GET", "", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.challenge, Some(bearer(&up, None)));
    // library/ included; containerd's ?ns= alike. Known now: not asked
    // upstream again.
    let before = up.registry_requests();
    for path in [
        "busybox/manifests/latest",
        "busybox/manifests/latest?ns=docker.io",
        "docker.io/busybox/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let a = ask(&st, "GET", path, None).await;
        assert_eq!(a.status, 401, "{path}");
        assert_eq!(
            a.challenge,
            Some(bearer(&up, Some("library/busybox"))),
            "{path}"
        );
    }
    let a = ask(&st, "HEAD", "acme/public/manifests/v1", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(up.registry_requests(), before, "challenge not remembered");
}

#[tokio::test]
async fn owner_pulls_a_private_image_with_its_own_token() {
    let (up, private, _) = registry().await;
    let st = start(&up, "").await;
    let t = token(&up, "acme/private", true).await;
    let tokens_before = up.token_requests();
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&t)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, private.manifest);
    for b in private.blobs() {
        let a = ask(
            &st,
            "GET",
            &format!("acme/private/blobs/{}", b.digest),
            Some(&t),
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body, b.data);
        assert_eq!(up.blob_gets(&b.digest), 1);
        // Known from the manifest: no HEAD per layer.
        assert_eq!(up.blob_heads(&b.digest), 0);
    }
    // Upstream saw the owner's token, and stowage asked for none of its own.
    let seen = up
        .last_request("GET", "/v2/acme/private/manifests/v1")
        .unwrap();
    assert_eq!(seen.header("authorization"), Some(t.clone()));
    assert_eq!(up.token_requests(), tokens_before);
    // Again with the same token: all from the cache, nothing upstream.
    let before = up.registry_requests();
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&t)).await;
    assert_eq!(a.status, 200);
    let a = ask(
        &st,
        "GET",
        &format!("acme/private/manifests/{}", private.digest),
        Some(&t),
    )
    .await;
    assert_eq!(a.status, 200);
    for b in private.blobs() {
        assert_eq!(
            ask(
                &st,
                "GET",
                &format!("acme/private/blobs/{}", b.digest),
                Some(&t)
            )
            .await
            .status,
            200
        );
    }
    assert_eq!(up.registry_requests(), before);
}

#[tokio::test]
async fn nobody_else_gets_a_private_image_from_the_cache() {
    let (up, private, public) = registry().await;
    let st = start(&up, "").await;
    let owner = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &owner).await;
    let fetched = up.all_blob_gets();
    let by_digest = format!("manifests/{}", private.digest);
    // No credentials at all: upstream's challenge, under either name.
    for repo in ["acme/private", "acme/public"] {
        for path in [
            "manifests/v1".to_string(),
            by_digest.clone(),
            format!("blobs/{}", private.layers[1].digest),
        ] {
            for method in ["GET", "HEAD"] {
                let a = ask(&st, method, &format!("{repo}/{path}"), None).await;
                assert_eq!(a.status, 401, "{method} {repo}/{path}");
                assert!(a.challenge.is_some(), "{method} {repo}/{path}");
            }
        }
    }
    // An anonymous token (upstream grants it nothing on the private
    // repository): upstream's refusal, relayed with its challenge.
    let anon = token(&up, "acme/private", false).await;
    for path in [
        "manifests/v1".to_string(),
        by_digest.clone(),
        format!("blobs/{}", private.layers[0].digest),
        format!("blobs/{}", private.config.digest),
    ] {
        let a = ask(&st, "GET", &format!("acme/private/{path}"), Some(&anon)).await;
        assert_eq!(a.status, 401, "{path}");
        assert_eq!(a.challenge, Some(bearer(&up, Some("acme/private"))));
    }
    // Allowed to read the public repository, asking for the private
    // digests under its name: not in that repository, so unknown.
    let anon_public = token(&up, "acme/public", false).await;
    let a = ask(
        &st,
        "GET",
        &format!("acme/public/{by_digest}"),
        Some(&anon_public),
    )
    .await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (404, Some("MANIFEST_UNKNOWN"))
    );
    for b in private.blobs() {
        for method in ["GET", "HEAD"] {
            let a = ask(
                &st,
                method,
                &format!("acme/public/blobs/{}", b.digest),
                Some(&anon_public),
            )
            .await;
            assert_eq!(a.status, 404, "{method} {}", b.digest);
            assert!(a.body.is_empty() || a.code.as_deref() == Some("BLOB_UNKNOWN"));
        }
    }
    // The public image pulls anonymously; a second anonymous caller gets
    // it from the cache after one check of the tag.
    pull(&st, "acme/public", "v1", &public, &anon_public).await;
    let gets = up.all_blob_gets();
    let heads = up.count_where(|r| r.method == "HEAD");
    let other_anon = token(&up, "acme/public", false).await;
    pull(&st, "acme/public", "v1", &public, &other_anon).await;
    assert_eq!(up.all_blob_gets(), gets, "public blobs fetched again");
    assert_eq!(
        up.count_where(|r| r.method == "HEAD"),
        heads + 1,
        "one check of the tag"
    );
    assert_eq!(up.all_blob_gets(), fetched + public.blobs().len());
}

/// GETs manifest and blobs of `img` as `repo:tag` with `auth`.
async fn pull(st: &Stowage, repo: &str, tag: &str, img: &Image, auth: &str) {
    let a = ask(st, "GET", &format!("{repo}/manifests/{tag}"), Some(auth)).await;
    assert_eq!(a.status, 200, "{repo}:{tag}");
    assert_eq!(a.body, img.manifest);
    for b in img.blobs() {
        let a = ask(st, "GET", &format!("{repo}/blobs/{}", b.digest), Some(auth)).await;
        assert_eq!(a.status, 200, "{repo} blob {}", b.digest);
        assert_eq!(sha256_digest(&a.body), b.digest);
    }
}

#[tokio::test]
async fn answers_are_remembered_per_credential_and_repository_until_the_ttl() {
    let (up, private, _) = registry().await;
    let st = start(&up, "passthrough_ttl = \"1s\"").await;
    let t1 = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &t1).await;
    let count = || up.registry_requests();
    // Same credential: nothing upstream.
    let before = count();
    pull(&st, "acme/private", "v1", &private, &t1).await;
    assert_eq!(count(), before);
    // Another credential: checked once (the tag), blobs known from the
    // manifest.
    let t2 = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &t2).await;
    assert_eq!(count(), before + 1);
    assert_eq!(
        up.last_request("HEAD", "/v2/acme/private/manifests/v1")
            .unwrap()
            .header("authorization"),
        Some(t2.clone())
    );
    // Past the TTL: checked again, once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    pull(&st, "acme/private", "v1", &private, &t1).await;
    assert_eq!(count(), before + 2);
    // A revoked token is refused at the next check.
    up.revoke_tokens();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&t1)).await;
    assert_eq!(a.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_is_joined_only_by_callers_upstream_lets_read_it() {
    let (up, private, _) = registry().await;
    // The owner's own blob request leads the fill here, not a prefetch.
    let st = start_stowage_no_prefetch(&up.url(), "auth = \"passthrough\"\n").await;
    let owner = token(&up, "acme/private", true).await;
    let layer = private.layers[1].clone();
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&owner)).await;
    assert_eq!(a.status, 200);
    let hold = up.hold(&layer.digest);
    let url = st.v2(&format!("acme/private/blobs/{}", layer.digest));
    let leader = {
        let owner = owner.clone();
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .get(url)
                .header("authorization", owner)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        })
    };
    hold.wait_half_sent(1).await;
    // While the owner's fill runs: an anonymous caller is refused under
    // the private name, and under the public one (not in that repository).
    let anon = token(&up, "acme/private", false).await;
    let a = ask(
        &st,
        "GET",
        &format!("acme/private/blobs/{}", layer.digest),
        Some(&anon),
    )
    .await;
    assert_eq!(a.status, 401);
    let anon_public = token(&up, "acme/public", false).await;
    let a = ask(
        &st,
        "GET",
        &format!("acme/public/blobs/{}", layer.digest),
        Some(&anon_public),
    )
    .await;
    assert_eq!(a.status, 404);
    // Another token of the owner's is checked, then joins.
    let owner2 = token(&up, "acme/private", true).await;
    let joiner = {
        let url = url.clone();
        tokio::spawn(async move {
            client()
                .get(url)
                .header("authorization", owner2)
                .send()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    hold.release();
    let joined = joiner.await.unwrap();
    assert_eq!(header(&joined, "x-stowage-cache").as_deref(), Some("join"));
    assert_eq!(joined.bytes().await.unwrap(), layer.data);
    assert_eq!(leader.await.unwrap(), layer.data);
    assert_eq!(up.blob_gets(&layer.digest), 1);
}

#[tokio::test]
async fn basic_auth_upstreams_get_the_callers_basic_credentials() {
    let up = FakeUpstream::start().await;
    up.require_basic("alice", "pw");
    let img = make_image(Format::Oci, &[500]);
    up.push_image("team/app", "v1", &img);
    let st = start(&up, "").await;
    let a = ask(&st, "GET", "", None).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.challenge.as_deref(),
        Some("Basic realm=\"Registry Realm\"")
    );
    let good = "Basic YWxpY2U6cHc="; // alice:pw
    pull(&st, "team/app", "v1", &img, good).await;
    assert_eq!(
        up.last_request("GET", "/v2/team/app/manifests/v1")
            .unwrap()
            .header("authorization")
            .as_deref(),
        Some(good)
    );
    let wrong = "Basic YWxpY2U6bm8="; // alice:no
    let a = ask(&st, "GET", "team/app/manifests/v1", Some(wrong)).await;
    assert_eq!(a.status, 401);
    let a = ask(
        &st,
        "GET",
        &format!("team/app/blobs/{}", img.layers[0].digest),
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.challenge.as_deref()),
        (401, Some("Basic realm=\"Registry Realm\""))
    );
}

/// The caller's token is nowhere but in the requests it was meant for: not
/// in the log (debug level), not in /metrics, not in the cache directory.
#[tokio::test]
async fn credentials_never_reach_logs_metrics_or_disk() {
    let (up, private, _) = registry().await;
    let dir = TempDir::new().unwrap();
    let cache = dir.path().join("cache");
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        config_toml(&cache, &up.url(), "auth = \"passthrough\""),
    )
    .unwrap();
    let mut p = Process::with_config(&config, &[("RUST_LOG", "stowage=trace,debug")]);
    // The two lines come in either order.
    let addr = p.listening_addr();
    let admin_of = |l: &str| {
        l.contains("admin listener")
            .then(|| l.split("addr=").nth(1).map(|a| a.trim().to_string()))
            .flatten()
    };
    let seen = p.log().iter().find_map(|l| admin_of(l));
    let admin = match seen {
        Some(a) => a,
        None => p.wait_line(admin_of),
    };
    let t = token(&up, "acme/private", true).await;
    let secret = t.trim_start_matches("Bearer ").to_string();
    let c = client();
    let base = format!("http://{addr}/v2/acme/private");
    let r = c
        .get(format!("{base}/manifests/v1"))
        .header("authorization", &t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for b in private.blobs() {
        let r = c
            .get(format!("{base}/blobs/{}", b.digest))
            .header("authorization", &t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap(), b.data);
    }
    // A refused one too (the error path logs).
    let r = c
        .get(format!("{base}/manifests/v1"))
        .header("authorization", "Bearer not-a-token-but-secret-too")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let metrics = c
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stowage_passthrough_checks_total"),
        "{metrics}"
    );
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = p.log().join("\n");
    assert!(
        log.contains("upstream request"),
        "debug log missing:\n{log}"
    );
    for s in [secret.as_str(), "not-a-token-but-secret-too"] {
        assert!(!log.contains(s), "log holds a credential");
        assert!(!metrics.contains(s), "metrics hold a credential");
        assert!(
            !dir_contains(&cache, s.as_bytes()),
            "cache holds a credential"
        );
    }
}

fn dir_contains(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            dir_contains(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|data| data.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

/// A stowage configuration: `private` as `private.example`, passthrough
/// (the default upstream), and `public` as `docker.io`, mirror mode.
fn mixed_config(dir: &TempDir, private: &FakeUpstream, public: &FakeUpstream) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {cache:?}\n\
         [[upstream]]\nhost = \"private.example\"\nurl = \"{private_url}\"\nauth = \"passthrough\"\n\
         [[upstream]]\nhost = \"docker.io\"\nurl = \"{public_url}\"\nlibrary_prefix = true\n",
        cache = dir.path().to_str().unwrap(),
        private_url = private.url(),
        public_url = public.url(),
    )
}

/// While the owner's fill of a private layer runs, a mirror-mode request
/// for that digest does not join it: it gets the mirror-mode upstream's
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_private_fill_is_not_joined_through_a_mirror_mode_upstream() {
    let (up, private, _) = registry().await;
    let public = FakeUpstream::start().await;
    public.set_strict_repos(true);
    let dir = TempDir::new().unwrap();
    let toml = mixed_config(&dir, &up, &public);
    let st = start_stowage_toml(dir, &toml).await;
    let owner = token(&up, "acme/private", true).await;
    let layer = private.layers[1].clone();
    let hold = up.hold(&layer.digest);
    let leader = {
        let url = st.v2(&format!("acme/private/blobs/{}", layer.digest));
        tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("authorization", owner)
                .send()
                .await
                .unwrap();
            r.bytes().await.unwrap()
        })
    };
    hold.wait_half_sent(1).await;
    for method in ["GET", "HEAD"] {
        let path = format!("docker.io/library/alpine/blobs/{}", layer.digest);
        let a = ask(&st, method, &path, None).await;
        assert_eq!(a.status, 404, "{method} {path}");
    }
    hold.release();
    assert_eq!(leader.await.unwrap(), layer.data);
    assert_eq!(up.blob_gets(&layer.digest), 1);
}

/// A passthrough upstream (`private.example`, the default) next to a
/// mirror-mode one (`docker.io`, public, holding none of the private
/// content): what the owner pulled through the passthrough upstream is
/// served through the mirror-mode one to nobody, by digest, GET or HEAD.
#[tokio::test]
async fn private_content_is_not_served_through_a_mirror_mode_upstream() {
    let (up, private, _) = registry().await;
    let public = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000]);
    public.push_image("library/alpine", "3", &img);
    public.set_strict_repos(true);
    let dir = TempDir::new().unwrap();
    let toml = mixed_config(&dir, &up, &public);
    let st = start_stowage_toml(dir, &toml).await;
    let owner = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &owner).await;
    // The mirror-mode upstream works.
    let alpine = async |st: &Stowage| {
        let a = ask(st, "GET", "docker.io/library/alpine/manifests/3", None).await;
        assert_eq!(a.status, 200);
        for b in img.blobs() {
            let path = format!("docker.io/library/alpine/blobs/{}", b.digest);
            let a = ask(st, "GET", &path, None).await;
            assert_eq!((a.status, sha256_digest(&a.body)), (200, b.digest.clone()));
        }
    };
    alpine(&st).await;
    // Private digests under its names: what it answers (404), not the
    // cache; after a restart too.
    let paths = [
        format!("docker.io/library/alpine/manifests/{}", private.digest),
        format!(
            "docker.io/library/alpine/blobs/{}",
            private.layers[0].digest
        ),
        format!("docker.io/library/alpine/blobs/{}", private.config.digest),
        format!(
            "library/alpine/blobs/{}?ns=docker.io",
            private.layers[1].digest
        ),
    ];
    let refused = async |st: &Stowage| {
        let asked = public.registry_requests();
        for path in &paths {
            for method in ["GET", "HEAD"] {
                let a = ask(st, method, path, None).await;
                assert_eq!(a.status, 404, "{method} {path}: private content served");
            }
        }
        assert_eq!(public.registry_requests(), asked + 2 * paths.len());
    };
    refused(&st).await;
    let dir = st.stop().await;
    let st = start_stowage_toml(dir, &toml).await;
    refused(&st).await;
    // Public content is still served from the cache through either.
    pull(&st, "acme/private", "v1", &private, &owner).await;
    let asked = public.registry_requests();
    alpine(&st).await;
    assert_eq!(
        public.registry_requests(),
        asked + 1,
        "only the tag revalidated"
    );
    // Once the mirror-mode upstream has a private digest too, it is public.
    public.push_image("library/alpine", "4", &private);
    for b in private.blobs() {
        let path = format!("docker.io/library/alpine/blobs/{}", b.digest);
        assert_eq!(ask(&st, "GET", &path, None).await.status, 200);
        let asked = public.registry_requests();
        assert_eq!(ask(&st, "HEAD", &path, None).await.status, 200);
        assert_eq!(public.registry_requests(), asked, "confirmed once");
    }
    assert_eq!(up.blob_gets(&private.layers[0].digest), 1);
}

/// Upstream registries that do not check what a pushed manifest refers to
/// (sparse indexes, foreign layers): an index in a repository anybody
/// reads, naming the private image's digests, lets nobody read them there.
#[tokio::test]
async fn references_in_a_readable_repository_do_not_unlock_private_digests() {
    let (up, private, _) = registry().await;
    // evil/pub: readable by anybody; an index naming the private manifest,
    // and an image whose layers are the private layers, none of them in
    // evil/pub.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": private.digest,
                       "size": private.manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    up.add_manifest(
        "evil/pub",
        Some("index"),
        OCI_INDEX,
        serde_json::to_vec(&index).unwrap(),
    );
    let layers: Vec<_> = private
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                    "digest": l.digest, "size": l.len()})
        })
        .collect();
    let image = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": private.config.digest, "size": private.config.len()},
        "layers": layers,
    });
    up.add_manifest(
        "evil/pub",
        Some("image"),
        OCI_MANIFEST,
        serde_json::to_vec(&image).unwrap(),
    );
    let st = start(&up, "").await;
    let owner = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &owner).await;
    let anon = token(&up, "evil/pub", false).await;
    for tag in ["index", "image"] {
        let a = ask(
            &st,
            "GET",
            &format!("evil/pub/manifests/{tag}"),
            Some(&anon),
        )
        .await;
        assert_eq!(a.status, 200, "{tag}");
    }
    let mut paths = vec![format!("evil/pub/manifests/{}", private.digest)];
    for b in private.blobs() {
        paths.push(format!("evil/pub/blobs/{}", b.digest));
    }
    for path in paths {
        for method in ["GET", "HEAD"] {
            let a = ask(&st, method, &path, Some(&anon)).await;
            assert_eq!(a.status, 404, "{method} {path}: private content served");
        }
    }
}

/// Whether a private digest is held or not changes nothing a caller not
/// allowed to read it sees: the same status, error code and message (but
/// for the digest), GET and HEAD, under the private and a public name.
#[tokio::test]
async fn refusals_do_not_tell_whether_a_private_digest_is_cached() {
    let (up, private, _) = registry().await;
    let st = start(&up, "").await;
    let owner = token(&up, "acme/private", true).await;
    // The owner fetches one layer only: layers[0] is held, layers[1] not.
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&owner)).await;
    assert_eq!(a.status, 200);
    let held = &private.layers[0].digest;
    let a = ask(
        &st,
        "GET",
        &format!("acme/private/blobs/{held}"),
        Some(&owner),
    )
    .await;
    assert_eq!(a.status, 200);
    let not_held = &private.layers[1].digest;
    // Manifests alike: v1's is held, v2's not.
    let other = make_image(Format::Oci, &[100]);
    up.push_image("acme/private", "v2", &other);
    let anon_private = token(&up, "acme/private", false).await;
    let anon_public = token(&up, "acme/public", false).await;
    for (repo, auth) in [
        ("acme/private", None),
        ("acme/private", Some(&anon_private)),
        ("acme/public", Some(&anon_public)),
    ] {
        for (method, kind) in [
            ("GET", "blobs"),
            ("HEAD", "blobs"),
            ("GET", "manifests"),
            ("HEAD", "manifests"),
        ] {
            let (held, not_held) = match kind {
                "blobs" => (held, not_held),
                _ => (&private.digest, &other.digest),
            };
            let mut answers = Vec::new();
            for digest in [held, not_held] {
                let a = ask(
                    &st,
                    method,
                    &format!("{repo}/{kind}/{digest}"),
                    auth.map(String::as_str),
                )
                .await;
                assert!(a.status == 401 || a.status == 404, "{method} {repo}");
                let body = String::from_utf8_lossy(&a.body).replace(digest.as_str(), "<digest>");
                answers.push((a.status, a.challenge, body));
            }
            assert_eq!(answers[0], answers[1], "{method} {repo}/{kind} {auth:?}");
        }
    }
}

/// Two passthrough upstreams behind one mirror: a client holds one
/// credential per mirror address, so it may present what one upstream
/// issued on a request for the other. The other upstream must never see
/// it: a token whose audience is another service, or credentials of
/// another scheme than the upstream's challenge, are answered with that
/// upstream's challenge instead of being passed on.
#[tokio::test]
async fn credentials_meant_for_one_upstream_are_not_passed_to_another() {
    let x = FakeUpstream::start().await;
    let y = FakeUpstream::start().await;
    for (up, service) in [(&x, "svc-x"), (&y, "svc-y")] {
        up.enable_auth(300);
        up.set_credentials(OWNER.0, OWNER.1);
        up.set_private("team/app");
        up.set_service(service);
        up.set_jwt_tokens(true);
        up.push_image("team/app", "v1", &make_image(Format::Oci, &[100]));
    }
    let dir = TempDir::new().unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {cache:?}\n\
         [[upstream]]\nhost = \"x.example\"\nurl = \"{x}\"\nauth = \"passthrough\"\n\
         [[upstream]]\nhost = \"y.example\"\nurl = \"{y}\"\nauth = \"passthrough\"\n",
        cache = dir.path().to_str().unwrap(),
        x = x.url(),
        y = y.url(),
    );
    let st = start_stowage_toml(dir, &toml).await;
    // Each upstream's challenge, as a client's first request learns it.
    for host in ["x.example", "y.example"] {
        let a = ask(&st, "GET", &format!("{host}/team/app/manifests/v1"), None).await;
        assert_eq!(a.status, 401, "{host}");
    }
    let for_x = token(&x, "team/app", true).await;
    let a = ask(&st, "GET", "x.example/team/app/manifests/v1", Some(&for_x)).await;
    assert_eq!(a.status, 200);
    let y_challenge = format!(
        "Bearer realm=\"{}/token\",service=\"svc-y\",scope=\"repository:team/app:pull\"",
        y.url()
    );
    let basic = "Basic b3duZXI6czNjcmV0LXB3"; // owner:s3cret-pw
    for (what, auth) in [("x's token", for_x.as_str()), ("Basic", basic)] {
        for path in [
            "y.example/team/app/manifests/v1".to_string(),
            format!("y.example/team/app/blobs/{}", sha256_digest(b"x")),
            "y.example/team/app/tags/list".to_string(),
        ] {
            let a = ask(&st, "GET", &path, Some(auth)).await;
            assert_eq!(a.status, 401, "{what} {path}");
            assert_eq!(
                a.challenge.as_deref(),
                Some(y_challenge.as_str()),
                "{what} {path}"
            );
        }
        let secret = auth.split(' ').nth(1).unwrap();
        let leaked = y.count_where(|r| {
            r.header("authorization")
                .is_some_and(|h| h.contains(secret))
        });
        assert_eq!(leaked, 0, "{what} reached y");
    }
    // y's own token works for y.
    let for_y = token(&y, "team/app", true).await;
    let a = ask(&st, "GET", "y.example/team/app/manifests/v1", Some(&for_y)).await;
    assert_eq!(a.status, 200);
}

/// Malformed, odd and huge `Authorization` headers: a clear OCI 401 with
/// upstream's challenge (or the request's own answer), never a crash or a
/// 5xx, and nothing remembered for them; one past the request head limit,
/// a 431.
#[tokio::test]
async fn odd_credentials_get_a_clear_refusal() {
    let (up, private, _) = registry().await;
    let st = start(&up, "").await;
    let owner = token(&up, "acme/private", true).await;
    pull(&st, "acme/private", "v1", &private, &owner).await;
    // Huge, but within the 64 KiB a request head may take.
    let huge = format!("Bearer {}", "A".repeat(60_000));
    let odd: Vec<http::HeaderValue> = vec![
        http::HeaderValue::from_static("Bearer"),
        http::HeaderValue::from_static("Bearer "),
        http::HeaderValue::from_static("bearer x.y.z"),
        http::HeaderValue::from_static("Bearer a.!!!notbase64.c"),
        http::HeaderValue::from_static("Bearer a.eyJleHAiOiJzb29uIn0.c"), // exp: "soon"
        // exp: u64::MAX, and -1
        http::HeaderValue::from_static("Bearer a.eyJleHAiOjE4NDQ2NzQ0MDczNzA5NTUxNjE1fQ.c"),
        http::HeaderValue::from_static("Bearer a.eyJleHAiOi0xfQ.c"),
        // aud: a number
        http::HeaderValue::from_static("Bearer a.eyJhdWQiOjF9.c"),
        http::HeaderValue::from_static("Basic"),
        http::HeaderValue::from_static("Basic !!!"),
        http::HeaderValue::from_static("Negotiate abc"),
        http::HeaderValue::from_static(""),
        http::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        http::HeaderValue::from_str(&huge).unwrap(),
    ];
    let paths = [
        "acme/private/manifests/v1".to_string(),
        format!("acme/private/manifests/{}", private.digest),
        format!("acme/private/blobs/{}", private.layers[0].digest),
        format!("acme/public/blobs/{}", private.layers[0].digest),
    ];
    for auth in &odd {
        for path in &paths {
            for method in ["GET", "HEAD"] {
                let r = client()
                    .request(method.parse().unwrap(), st.v2(path))
                    .header("authorization", auth.clone())
                    .send()
                    .await
                    .unwrap();
                let what = format!("{method} {path} with {} bytes", auth.len());
                assert_eq!(r.status(), 401, "{what}");
                assert!(header(&r, "www-authenticate").is_some(), "{what}");
                if method == "GET" {
                    assert_oci_error(r, 401, &["UNAUTHORIZED"], &what).await;
                }
            }
        }
    }
    // Past the 64 KiB a request head may take: refused before any route.
    let r = client()
        .get(st.v2("acme/private/manifests/v1"))
        .header("authorization", format!("Bearer {}", "A".repeat(200_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "a 200 KB credential");
    // Two Authorization headers: the first is the caller's.
    let r = client()
        .get(st.v2("acme/private/manifests/v1"))
        .header("authorization", "Bearer nope")
        .header("authorization", owner.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// The owner's first pull of a multi-platform private image costs one
/// check (the tag's `HEAD`): the platform manifest and the blobs are
/// checked by their own downloads, each fetched once.
#[tokio::test]
async fn a_first_multi_platform_pull_is_one_check_and_the_downloads() {
    let (up, _, _) = registry().await;
    up.set_private("acme/multi");
    let amd = make_image_for(Format::Oci, &[1000, 2000], "amd64");
    let arm = make_image_for(Format::Oci, &[3000], "arm64");
    let index = make_index(Format::Oci, vec![(amd.clone(), "amd64"), (arm, "arm64")]);
    up.push_index("acme/multi", "v1", &index);
    let st = start(&up, "").await;
    let owner = token(&up, "acme/multi", true).await;
    let before = up.registry_requests();
    let a = ask(&st, "GET", "acme/multi/manifests/v1", Some(&owner)).await;
    assert_eq!((a.status, a.body), (200, index.manifest.clone()));
    pull(&st, "acme/multi", &amd.digest, &amd, &owner).await;
    let heads = up.count_where(|r| r.method == "HEAD");
    assert_eq!(heads, 1, "one check");
    assert_eq!(up.registry_requests(), before + 1 + 2 + amd.blobs().len());
    // Another token of the owner's: one check again, all from the cache.
    let owner2 = token(&up, "acme/multi", true).await;
    let before = up.registry_requests();
    let a = ask(&st, "GET", "acme/multi/manifests/v1", Some(&owner2)).await;
    assert_eq!(a.status, 200);
    pull(&st, "acme/multi", &amd.digest, &amd, &owner2).await;
    assert_eq!(up.registry_requests(), before + 1);
}

#[tokio::test]
async fn prefetch_asks_upstream_with_the_callers_credentials_only() {
    let (up, private, _) = registry().await;
    let st = start(&up, "").await;
    // Anonymous: refused, so nothing is prefetched.
    let anon = token(&up, "acme/private", false).await;
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&anon)).await;
    assert_eq!(a.status, 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.all_blob_gets(),
        0,
        "nothing fetched for a refused caller"
    );
    // The owner: the manifest's blobs are fetched before the owner asks,
    // with the owner's credential.
    let owner = token(&up, "acme/private", true).await;
    let a = ask(&st, "GET", "acme/private/manifests/v1", Some(&owner)).await;
    assert_eq!(a.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !private.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "prefetch did not run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for b in private.blobs() {
        let r = up
            .last_request("GET", &format!("/v2/acme/private/blobs/{}", b.digest))
            .unwrap();
        assert_eq!(r.header("authorization").as_deref(), Some(owner.as_str()));
    }
    // The cache still answers only callers upstream lets read the blob.
    let a = ask(
        &st,
        "GET",
        &format!("acme/private/blobs/{}", private.layers[0].digest),
        Some(&anon),
    )
    .await;
    assert_eq!(a.status, 401);
    let a = ask(
        &st,
        "GET",
        &format!("acme/private/blobs/{}", private.layers[0].digest),
        Some(&owner),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, private.layers[0].data);
    assert_eq!(up.blob_gets(&private.layers[0].digest), 1);
}

/// A private mark whose record could not be written (the log unwritable,
/// as on a full disk) keeps the blob off the disk; the next fetch, with
/// the log writable again, writes the mark before storing the blob. It
/// once found the digest marked in memory and stored the blob with no
/// record: public after a restart.
#[tokio::test]
async fn a_mark_that_failed_to_reach_the_log_is_written_before_the_blob_is_stored() {
    let (up, private, _) = registry().await;
    let public = FakeUpstream::start().await;
    public.set_strict_repos(true);
    let dir = TempDir::new().unwrap();
    let toml = format!("prefetch = false\n{}", mixed_config(&dir, &up, &public));
    let st = start_stowage_toml(dir, &toml).await;
    let owner = token(&up, "acme/private", true).await;
    let layer = &private.layers[0];
    let log = st.dir.path().join("private.log");
    let _ = std::fs::remove_file(&log);
    std::fs::create_dir(&log).unwrap(); // cannot be appended to
    let path = format!("acme/private/blobs/{}", layer.digest);
    let stored = stowage::test_hooks::blob_path(st.dir.path(), &layer.digest);
    let a = ask(&st, "GET", &path, Some(&owner)).await;
    assert_eq!(
        (a.status, sha256_digest(&a.body)),
        (200, layer.digest.clone())
    );
    while st.hooks.fills_in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!stored.exists(), "stored without its mark");
    std::fs::remove_dir(&log).unwrap();
    let a = ask(&st, "GET", &path, Some(&owner)).await;
    assert_eq!(a.status, 200);
    for _ in 0..250 {
        if stored.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stored.exists(), "the second fetch stores the blob");
    let mirror = format!("docker.io/library/alpine/blobs/{}", layer.digest);
    assert_eq!(ask(&st, "GET", &mirror, None).await.status, 404);
    let dir = st.stop().await;
    let st = start_stowage_toml(dir, &toml).await;
    assert!(stored.exists());
    let a = ask(&st, "GET", &mirror, None).await;
    assert_eq!(
        a.status, 404,
        "private blob served to a mirror-mode caller after a restart"
    );
}

/// Two passthrough callers ask for a tag (and a subject's referrers) past
/// its TTL at once; the first's token was revoked upstream, the second's
/// is valid. They share one revalidation; its 401 answers only the
/// caller whose credential it refused: the second is served. It once got
/// the first's 401.
#[tokio::test]
async fn a_refusal_of_one_credential_is_not_shared_with_another_callers_load() {
    let (up, private, _) = registry().await;
    let st = start_stowage_no_prefetch(&up.url(), "auth = \"passthrough\"\ntag_ttl = \"1s\"").await;
    let revoked = token(&up, "acme/private", true).await;
    let paths = [
        "acme/private/manifests/v1".to_string(),
        format!("acme/private/referrers/{}", private.digest),
    ];
    for path in &paths {
        assert_eq!(ask(&st, "GET", path, Some(&revoked)).await.status, 200);
    }
    up.revoke_tokens();
    let valid = token(&up, "acme/private", true).await;
    for path in &paths {
        assert_eq!(ask(&st, "GET", path, Some(&valid)).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for path in &paths {
        up.delay(&format!("/v2/{path}"), Duration::from_millis(500));
        let first = ask(&st, "GET", path, Some(&revoked));
        let second = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ask(&st, "GET", path, Some(&valid)).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!(first.status, 401, "{path}: the revoked token");
        assert_eq!(
            second.status, 200,
            "{path}: the valid token got the other's refusal"
        );
    }
}
