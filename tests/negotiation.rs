//! Content negotiation: the client's `Accept` decides what stowage asks
//! upstream and what it serves, tags are cached per accept class, and a
//! manifest by digest is served only in a media type the client accepts
//! (issue 12, part 1). The fake upstream negotiates as distribution 2.8
//! does (tests/fake_upstream.rs checks it), so every answer here is
//! compared with what upstream gives the same `Accept` directly.

mod common;

use common::*;

/// A client's `Accept`, or none at all.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// Docker schema 2 only (an old docker, the client).
    Schema2,
    /// OCI manifest and index only.
    Oci,
    /// List/index aware: all four (dockerd, containerd, podman, skopeo).
    All,
    /// No `Accept` header at all.
    Bare,
}

impl Client {
    fn accept(self) -> Option<String> {
        match self {
            Client::Schema2 => Some(DOCKER_MANIFEST.to_string()),
            Client::Oci => Some(format!("{OCI_MANIFEST}, {OCI_INDEX}")),
            Client::All => Some(ACCEPT_ALL.to_string()),
            Client::Bare => None,
        }
    }
}

/// What a manifest request was answered with.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    digest: Option<String>,
    /// `errors[0].code` of an error body.
    code: Option<String>,
}

/// `method` of `url` as `client` sends it (no `Accept` at all for `Bare`).
async fn ask(base: &str, path: &str, client: Client, method: &str) -> Answer {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let (status, headers, body) = match client.accept() {
        Some(accept) => {
            let r = common::client()
                .request(method.parse().unwrap(), format!("{base}{path}"))
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            (status, headers, r.bytes().await.unwrap())
        }
        None => {
            let r = raw_request(addr, method, path).await;
            (r.status, r.headers, r.body)
        }
    };
    let h = |n: &str| {
        headers
            .get(n)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string));
    let schema1 = h("content-type").is_some_and(|t| t.contains("distribution.manifest.v1+"));
    if method == "GET" && status == 200 && !schema1 {
        assert_eq!(
            h("docker-content-digest"),
            Some(sha256_digest(&body)),
            "GET {path} as {client:?}: body does not hash to its digest"
        );
    }
    Answer {
        status,
        content_type: h("content-type"),
        digest: h("docker-content-digest"),
        code: if status == 200 { None } else { code },
    }
}

/// What stowage must answer when upstream answers `up`: the same manifest,
/// or 404 MANIFEST_UNKNOWN where upstream refuses or would convert to
/// schema 1 (stowage never converts).
fn expected(up: &Answer) -> Answer {
    let schema1 = up
        .content_type
        .as_deref()
        .is_some_and(|t| t.contains("distribution.manifest.v1+"));
    if up.status == 200 && !schema1 {
        Answer {
            status: 200,
            content_type: up.content_type.clone(),
            digest: up.digest.clone(),
            code: None,
        }
    } else {
        Answer {
            status: 404,
            content_type: Some("application/json".into()),
            digest: None,
            code: Some("MANIFEST_UNKNOWN".into()),
        }
    }
}

/// A two-platform Docker list at `app/docker:v1` and a two-platform OCI
/// index at `app/oci:v1`.
async fn upstream_with_lists() -> (FakeUpstream, Index, Index) {
    let up = FakeUpstream::start().await;
    let docker = make_index(
        Format::Docker,
        vec![
            (make_image_for(Format::Docker, &[300], "amd64"), "amd64"),
            (make_image_for(Format::Docker, &[300], "arm64"), "arm64"),
        ],
    );
    up.push_index("app/docker", "v1", &docker);
    let oci = make_index(
        Format::Oci,
        vec![
            (make_image_for(Format::Oci, &[300], "amd64"), "amd64"),
            (make_image_for(Format::Oci, &[300], "arm64"), "arm64"),
        ],
    );
    up.push_index("app/oci", "v1", &oci);
    (up, docker, oci)
}

/// The measurement: after a list-aware client pulled a
/// two-platform tag, a client accepting only schema 2 gets what upstream
/// gives it (the linux/amd64 manifest), not the cached list.
#[tokio::test]
async fn schema2_client_after_list_client_gets_the_amd64_manifest() {
    let (up, docker, _) = upstream_with_lists().await;
    let st = start_stowage(&up.url(), "").await;
    let path = "/v2/app/docker/manifests/v1";
    let list = ask(&st.url(), path, Client::All, "GET").await;
    assert_eq!(list.digest.as_deref(), Some(docker.digest.as_str()));
    let amd64 = &docker.images[0].0;
    for method in ["GET", "HEAD"] {
        let a = ask(&st.url(), path, Client::Schema2, method).await;
        assert_eq!(
            (a.status, a.digest.as_deref(), a.content_type.as_deref()),
            (200, Some(amd64.digest.as_str()), Some(DOCKER_MANIFEST)),
            "{method} as a schema 2 client"
        );
    }
    // Each class asked upstream once; repeats are hits.
    let gets = up.manifest_gets("app/docker", "v1");
    for client in [Client::All, Client::Schema2, Client::All, Client::Schema2] {
        assert_eq!(ask(&st.url(), path, client, "GET").await.status, 200);
    }
    assert_eq!(
        up.manifest_gets("app/docker", "v1"),
        gets,
        "repeats went upstream"
    );
    assert_eq!(gets, 2, "one upstream GET per accept class");
    // The upstream GET of each class carried that class's Accept.
    let accepts: Vec<String> = up
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/v2/app/docker/manifests/v1")
        .map(|r| r.header("accept").unwrap_or_default())
        .collect();
    assert_eq!(accepts.len(), 2);
    assert!(accepts[0].contains(DOCKER_LIST), "{accepts:?}");
    assert_eq!(accepts[1], DOCKER_MANIFEST, "{accepts:?}");
}

/// Schema 2, OCI, list/index and bare clients in every order, on a fresh
/// stowage each time, GET and HEAD, by tag and by digest: stowage answers
/// each exactly as upstream answers that client (404 where upstream would
/// convert to schema 1).
#[tokio::test]
async fn every_client_in_every_order_gets_what_upstream_gives_it() {
    let (up, docker, oci) = upstream_with_lists().await;
    let clients = [Client::Schema2, Client::Oci, Client::All, Client::Bare];
    let mut paths = vec![
        "/v2/app/docker/manifests/v1".to_string(),
        "/v2/app/oci/manifests/v1".to_string(),
        format!("/v2/app/docker/manifests/{}", docker.digest),
        format!("/v2/app/oci/manifests/{}", oci.digest),
    ];
    for (img, _) in docker.images.iter().chain(oci.images.iter()) {
        let repo = if img.media_type == MediaType::OciManifest {
            "oci"
        } else {
            "docker"
        };
        paths.push(format!("/v2/app/{repo}/manifests/{}", img.digest));
    }
    // The truth, straight from upstream.
    let mut want = std::collections::HashMap::new();
    for p in &paths {
        for c in clients {
            for m in ["GET", "HEAD"] {
                let up_answer = ask(&up.url(), p, c, m).await;
                want.insert((p.clone(), format!("{c:?}"), m), expected(&up_answer));
            }
        }
    }
    for order in permutations(&clients) {
        let st = start_stowage(&up.url(), "").await;
        for p in &paths {
            for c in &order {
                for m in ["GET", "HEAD"] {
                    let mut got = ask(&st.url(), p, *c, m).await;
                    let w = &want[&(p.clone(), format!("{c:?}"), m)];
                    if m == "HEAD" {
                        got.code = w.code.clone(); // no body to read it from
                    }
                    assert_eq!(&got, w, "{m} {p} as {c:?}, order {order:?}");
                }
            }
        }
    }
}

fn permutations(items: &[Client]) -> Vec<Vec<Client>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, first);
            out.push(p);
        }
    }
    out
}

/// A manifest cached by one client is not served by digest to a client
/// that does not accept its media type: 404 MANIFEST_UNKNOWN, as a
/// registry answers, GET and HEAD alike, without asking upstream.
#[tokio::test]
async fn cached_oci_manifest_by_digest_is_refused_to_a_docker_client() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[100]);
    up.push_image("app/oci", "v1", &img);
    let st = start_stowage(&up.url(), "").await;
    let path = format!("/v2/app/oci/manifests/{}", img.digest);
    assert_eq!(ask(&st.url(), &path, Client::All, "GET").await.status, 200);
    let before = up.manifest_requests("app/oci");
    for client in [Client::Schema2, Client::Bare] {
        for method in ["GET", "HEAD"] {
            let a = ask(&st.url(), &path, client, method).await;
            assert_eq!(a.status, 404, "{method} as {client:?}");
            if method == "GET" {
                assert_eq!(a.code.as_deref(), Some("MANIFEST_UNKNOWN"));
            }
        }
    }
    assert_eq!(ask(&st.url(), &path, Client::Oci, "HEAD").await.status, 200);
    assert_eq!(
        up.manifest_requests("app/oci"),
        before,
        "asked upstream again"
    );
}

/// Tags are cached per class on disk too: after a restart with upstream
/// down, each class is served stale the digest it was given.
#[tokio::test]
async fn each_class_is_served_stale_its_own_digest() {
    let (up, docker, _) = upstream_with_lists().await;
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let path = "/v2/app/docker/manifests/v1";
    let amd64 = docker.images[0].0.digest.clone();
    assert_eq!(
        ask(&st.url(), path, Client::All, "GET").await.digest,
        Some(docker.digest.clone())
    );
    assert_eq!(
        ask(&st.url(), path, Client::Schema2, "GET").await.digest,
        Some(amd64.clone())
    );
    let dir = st.stop().await;
    up.set_failure(Failure::Down);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"1s\"").await;
    for (client, want) in [
        (Client::Schema2, &amd64),
        (Client::All, &docker.digest),
        (Client::Schema2, &amd64),
    ] {
        let a = ask(&st.url(), path, client, "GET").await;
        assert_eq!(
            (a.status, a.digest.as_deref()),
            (200, Some(want.as_str())),
            "stale as {client:?}"
        );
    }
    // A class never asked has nothing to be stale with.
    let a = ask(&st.url(), path, Client::Oci, "GET").await;
    assert_eq!(a.status, 503, "{a:?}");
}

/// An upstream that labels manifests `application/json` (a generic type):
/// the body's `mediaType` decides, so a Docker-only client is served a
/// Docker manifest, and an OCI-only client is refused it, as the labelled
/// type would be.
#[tokio::test]
async fn a_generic_content_type_is_decided_by_the_body() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Docker, &[10]);
    up.push_image("library/app", "v1", &img);
    up.add_manifest(
        "library/app",
        Some("json"),
        "application/json",
        img.manifest.clone(),
    );
    let st = start_stowage(&up.url(), "").await;
    let a = ask(&st.url(), "/v2/app/manifests/json", Client::Schema2, "GET").await;
    assert_eq!(
        (a.status, a.content_type.as_deref(), a.digest.as_deref()),
        (200, Some(DOCKER_MANIFEST), Some(img.digest.as_str())),
        "{a:?}"
    );
    let a = ask(&st.url(), "/v2/app/manifests/json", Client::Oci, "GET").await;
    assert_eq!(
        (a.status, a.code.as_deref()),
        (404, Some("MANIFEST_UNKNOWN")),
        "{a:?}"
    );
}
