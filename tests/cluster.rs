//! Cluster mode: several in-process nodes on loopback in front of the fake
//! upstream (which counts requests), and fake peers (a second fake
//! registry listed as a node) for faults: a dead owner, a peer that comes
//! back, a peer that sends wrong bytes, an owner dying mid-body, hop
//! marking with inconsistent peer lists, the cluster secret.

mod common;

use std::time::Duration;

use common::*;
use tempfile::TempDir;

const REPO: &str = "test/app";

/// A random blob whose owner among `urls` is `urls[owner]`.
fn blob_owned_by(urls: &[String], owner: usize, size: usize) -> Blob {
    loop {
        let b = Blob::random(size);
        if owner_of_digest(urls, &b.digest) == owner {
            return b;
        }
    }
}

/// A random tag whose owner among `urls` is `urls[owner]`.
fn tag_owned_by(urls: &[String], owner: usize) -> String {
    loop {
        let tag = format!("t{}", common::image::random_hex(4));
        if owner_of_tag(urls, REPO, &tag) == owner {
            return tag;
        }
    }
}

fn stored(st: &Stowage, digest: &str) -> bool {
    stowage::test_hooks::blob_path(st.dir.path(), digest).exists()
}

/// Waits (10 s at most) until `st` has `digest` in its store.
async fn wait_stored(st: &Stowage, digest: &str) {
    for _ in 0..200 {
        if stored(st, digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never stored {digest}", st.url());
}

/// GET with extra headers; the status and the body (or its error).
async fn get_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Result<bytes::Bytes, reqwest::Error>) {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = within(30, url, req.send()).await.unwrap();
    (r.status().as_u16(), r.bytes().await)
}

fn urls_of(nodes: &[Stowage]) -> Vec<String> {
    nodes.iter().map(|n| n.url()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_across_three_nodes_fetches_a_blob_once() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(4 << 20);
    let digest = up.add_blob(blob.data.clone());
    let hold = up.hold(&digest);
    let nodes = start_cluster(3, &up.url(), "").await;
    let owner = owner_of_digest(&urls_of(&nodes), &digest);

    let c = client();
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = nodes[i % 3].blob_url(REPO, &digest);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
            r.bytes().await.unwrap()
        }));
    }
    // Everybody is waiting on the one upstream body, half sent.
    hold.wait_half_sent(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.release();
    for t in tasks {
        let body = within(30, "storm client", t).await.unwrap();
        assert_eq!(sha256_digest(&body), digest, "every body verifies");
    }
    assert_eq!(up.blob_gets(&digest), 1, "one upstream GET cluster-wide");
    for (i, n) in nodes.iter().enumerate() {
        let upstream = metric(n, "stowage_upstream_requests_total", &[("kind", "blob")]).await;
        let hops = metric(n, "stowage_owner_hops_total", &[("kind", "blob")]).await;
        if i == owner {
            assert_eq!(
                (upstream, hops),
                (1.0, 0.0),
                "the owner fetched it upstream"
            );
        } else {
            assert_eq!(
                (upstream, hops),
                (0.0, 1.0),
                "node {i} asked the owner once"
            );
            let ok = metric(
                n,
                "stowage_peer_requests_total",
                &[("kind", "blob"), ("result", "ok")],
            )
            .await;
            assert_eq!(ok, 1.0, "node {i}: one peer request for 10 clients");
        }
        // Each node keeps its own verified copy.
        wait_stored(n, &digest).await;
    }
    // Hits from now on: no more peer or upstream traffic.
    let before: f64 = {
        let mut t = 0.0;
        for n in &nodes {
            t += metric(n, "stowage_peer_requests_total", &[]).await;
        }
        t
    };
    for n in &nodes {
        check_blob(&c, n, REPO, &blob).await;
    }
    let mut after = 0.0;
    for n in &nodes {
        after += metric(n, "stowage_peer_requests_total", &[]).await;
    }
    assert_eq!(before, after);
    assert_eq!(up.blob_gets(&digest), 1);
    assert_eq!(up.blob_heads(&digest), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_of_an_uncached_blob_asks_the_owner() {
    let up = FakeUpstream::start().await;
    let nodes = start_cluster(2, &up.url(), "").await;
    let urls = urls_of(&nodes);
    let blob = blob_owned_by(&urls, 1, 10_000);
    up.add_blob(blob.data.clone());
    let r = within(
        10,
        "HEAD",
        client().head(nodes[0].blob_url(REPO, &blob.digest)).send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some("10000".into()));
    assert_eq!(up.blob_heads(&blob.digest), 1, "the owner asked upstream");
    assert_eq!(up.blob_gets(&blob.digest), 0, "HEAD starts no fill");
    assert_eq!(
        metric(&nodes[0], "stowage_upstream_requests_total", &[]).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_through_each_node_costs_one_upstream_request_per_ttl() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000, 2000]);
    up.push_image(REPO, "v1", &img);
    let nodes = start_cluster(3, &up.url(), "tag_ttl = \"2s\"").await;
    let c = client();
    for n in &nodes {
        check_manifest(&c, n, REPO, "v1", &img.manifest, img.media_type.as_str()).await;
    }
    assert_eq!(
        up.manifest_requests(REPO),
        1,
        "the tag's owner fetched it once; the others asked the owner"
    );
    let digest = sha256_digest(&img.manifest);
    for n in &nodes {
        check_manifest(&c, n, REPO, &digest, &img.manifest, img.media_type.as_str()).await;
    }
    assert_eq!(up.manifest_requests(REPO), 1, "by digest: held everywhere");

    // The owner tells the others how long the tag stays fresh.
    let tag_owner = { owner_of_tag(&urls_of(&nodes), REPO, "v1") };
    let r = client()
        .get(format!(
            "{}?ns=docker.io",
            nodes[tag_owner].manifest_url(REPO, "v1")
        ))
        .header("x-stowage-hop", "http://test:1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fresh: u64 = header(&r, "x-stowage-fresh-ms").unwrap().parse().unwrap();
    assert!(fresh <= 2000, "fresh for {fresh} ms");

    // Past the TTL: one revalidation (HEAD) cluster-wide.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for n in &nodes {
        get_ok(&c, &n.manifest_url(REPO, "v1")).await;
    }
    assert_eq!(up.manifest_heads(REPO, "v1"), 1, "one HEAD for three nodes");
    assert_eq!(up.manifest_requests(REPO), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_owner_falls_to_the_next_node_and_is_not_retried_at_once() {
    let up = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let dead = dead_url().await;
    let urls = vec![me.clone(), dead];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    let c = client();
    let a = blob_owned_by(&urls, 1, 100_000);
    up.add_blob(a.data.clone());
    check_blob(&c, n, REPO, &a).await;
    assert_eq!(up.blob_gets(&a.digest), 1, "went upstream itself");
    let unreachable = [("kind", "blob"), ("result", "unreachable")];
    assert_eq!(
        metric(n, "stowage_peer_requests_total", &unreachable).await,
        1.0
    );
    assert_eq!(
        metric(n, "stowage_cluster_peers", &[("state", "down")]).await,
        1.0
    );
    // While it is down its keys are this node's: no attempt, no delay.
    let b = blob_owned_by(&urls, 1, 100_000);
    up.add_blob(b.data.clone());
    check_blob(&c, n, REPO, &b).await;
    assert_eq!(
        metric(n, "stowage_peer_requests_total", &unreachable).await,
        1.0
    );
    assert_eq!(up.blob_gets(&b.digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_comes_back_is_probed_and_used_again() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    peer.set_failure(Failure::Down);
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    let c = client();
    let a = blob_owned_by(&urls, 1, 50_000);
    up.add_blob(a.data.clone());
    check_blob(&c, n, REPO, &a).await;
    assert_eq!(up.blob_gets(&a.digest), 1);
    assert_eq!(
        metric(n, "stowage_cluster_peers", &[("state", "down")]).await,
        1.0
    );
    // Back: the probe (after a 1 s backoff) marks it up.
    peer.set_failure(Failure::None);
    metric_becomes(n, "stowage_cluster_peers", &[("state", "up")], 1.0).await;
    assert!(peer.count("GET", "/v2/") >= 1, "probed with GET /v2/");
    let probe_hop = peer
        .last_request("GET", "/v2/")
        .unwrap()
        .header("x-stowage-hop");
    assert_eq!(probe_hop.as_deref(), Some(nodes[0].url().as_str()));
    // Its keys go to it again.
    let b = blob_owned_by(&urls, 1, 50_000);
    peer.add_blob(b.data.clone());
    up.add_blob(b.data.clone());
    check_blob(&c, n, REPO, &b).await;
    assert_eq!(peer.blob_gets(&b.digest), 1, "asked the owner");
    assert_eq!(up.blob_gets(&b.digest), 0);
    let asked = peer
        .last_request("GET", &format!("/v2/{REPO}/blobs/{}", b.digest))
        .unwrap();
    assert_eq!(asked.query.as_deref(), Some("ns=docker.io"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_sending_wrong_bytes_is_caught_and_nothing_is_cached() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    let blob = blob_owned_by(&urls, 1, 300_000);
    peer.add_blob(blob.data.clone());
    up.add_blob(blob.data.clone());
    peer.corrupt(&blob.digest);
    let url = n.blob_url(REPO, &blob.digest);
    let (status, body) = get_with(&url, &[]).await;
    assert_eq!(status, 200, "headers go out before the end is verified");
    assert!(body.is_err(), "the body is cut: the last byte never leaves");
    assert!(!stored(n, &blob.digest), "nothing cached");
    assert_eq!(
        metric(n, "stowage_digest_mismatches_total", &[("kind", "blob")]).await,
        1.0
    );
    let mismatch = [("kind", "blob"), ("result", "mismatch")];
    assert_eq!(
        metric(n, "stowage_peer_requests_total", &mismatch).await,
        1.0
    );
    // The peer is distrusted for a while: the retry goes upstream.
    let (status, body) = get_with(&url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), blob.digest);
    assert_eq!(up.blob_gets(&blob.digest), 1);
    assert_eq!(peer.blob_gets(&blob.digest), 1);
    wait_stored(n, &blob.digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_dying_mid_body_is_continued_from_upstream_with_a_range() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    let blob = blob_owned_by(&urls, 1, 1 << 20);
    peer.add_blob(blob.data.clone());
    up.add_blob(blob.data.clone());
    peer.truncate(&blob.digest);
    let c = client();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            let url = n.blob_url(REPO, &blob.digest);
            tokio::spawn(async move { get_ok(&c, &url).await.1 })
        })
        .collect();
    for t in clients {
        let body = within(30, "client", t).await.unwrap();
        assert_eq!(
            sha256_digest(&body),
            blob.digest,
            "no client saw the failure"
        );
    }
    assert_eq!(peer.blob_gets(&blob.digest), 1);
    assert_eq!(up.blob_gets(&blob.digest), 1, "the rest, once");
    let asked = up
        .last_request("GET", &format!("/v2/{REPO}/blobs/{}", blob.digest))
        .unwrap();
    assert_eq!(
        asked.header("range"),
        Some(format!("bytes={}-", blob.len() / 2)),
        "only the missing part"
    );
    let broken = [("kind", "blob"), ("result", "broken")];
    assert_eq!(metric(n, "stowage_peer_requests_total", &broken).await, 1.0);
    wait_stored(n, &blob.digest).await;
    let kept = std::fs::read(stowage::test_hooks::blob_path(n.dir.path(), &blob.digest)).unwrap();
    assert_eq!(sha256_digest(&kept), blob.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hop_marked_request_is_never_forwarded() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    let blob = blob_owned_by(&urls, 1, 20_000);
    up.add_blob(blob.data.clone());
    let img = make_image(Format::Oci, &[100]);
    up.push_image(REPO, "v1", &img);
    let hop = [("x-stowage-hop", "http://somebody:1")];
    let (status, body) = get_with(&n.blob_url(REPO, &blob.digest), &hop).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), blob.digest);
    let (status, _) = get_with(&n.manifest_url(REPO, "v1"), &hop).await;
    assert_eq!(status, 200);
    assert_eq!(peer.total(), 0, "the owner was never asked");
    assert_eq!(up.blob_gets(&blob.digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inconsistent_peer_lists_cannot_make_a_loop() {
    // Node B advertises itself as localhost, node A knows it as 127.0.0.1:
    // each believes the other owns the key. One hop, then B serves.
    let up = FakeUpstream::start().await;
    let ports = free_ports(2);
    let (pa, pb) = (ports[0], ports[1]);
    let a = format!("http://127.0.0.1:{pa}");
    let b_as_a_sees = format!("http://127.0.0.1:{pb}");
    let b_itself = format!("http://localhost:{pb}");
    let view_a = vec![a.clone(), b_as_a_sees.clone()];
    let view_b = vec![a.clone(), b_itself.clone()];
    let blob = loop {
        let blob = Blob::random(30_000);
        if owner_of_digest(&view_a, &blob.digest) == 1
            && owner_of_digest(&view_b, &blob.digest) == 0
        {
            break blob;
        }
    };
    up.add_blob(blob.data.clone());
    let node_a = start_cluster_nodes(std::slice::from_ref(&a), &view_a, &up.url(), "", |_| {
        String::new()
    })
    .await
    .remove(0);
    // B listens on 127.0.0.1:pb but advertises localhost:pb.
    let node_b = {
        let dir = TempDir::new().unwrap();
        let toml = format!(
            "listen = \"127.0.0.1:{pb}\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {:?}\n\
             [[upstream]]\nhost = \"docker.io\"\nurl = \"{}\"\n\
             [cluster]\nadvertise = \"{b_itself}\"\npeers = [\"{a}\"]\n",
            dir.path().to_str().unwrap(),
            up.url()
        );
        start_stowage_toml(dir, &toml).await
    };
    let (status, body) = get_with(&node_a.blob_url(REPO, &blob.digest), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), blob.digest);
    assert_eq!(up.blob_gets(&blob.digest), 1);
    assert_eq!(
        metric(&node_a, "stowage_owner_hops_total", &[]).await,
        1.0,
        "A asked B"
    );
    assert_eq!(
        metric(&node_b, "stowage_owner_hops_total", &[]).await,
        0.0,
        "B, asked by a peer, never forwarded"
    );
    assert_eq!(
        metric(
            &node_b,
            "stowage_peer_requests_received_total",
            &[("result", "accepted")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&node_a, "stowage_peer_requests_received_total", &[]).await,
        0.0
    );
}

/// A secret file with `secret` in `dir`; its TOML line for `[cluster]`.
fn secret_line(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    format!("secret_file = {:?}", path.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_secret_guards_the_peer_path() {
    let up = FakeUpstream::start().await;
    let files = TempDir::new().unwrap();
    let good = secret_line(files.path(), "good", "0123456789abcdef0123456789abcdef");
    let htpasswd = files.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    let access = format!("[access]\nhtpasswd = {:?}\n", htpasswd.to_str().unwrap());
    let urls = node_urls(2);
    let nodes =
        start_cluster_nodes(&urls, &urls, &up.url(), "", |_| format!("{good}\n{access}")).await;
    let blob = blob_owned_by(&urls, 1, 40_000);
    up.add_blob(blob.data.clone());
    let url = format!("{}?ns=docker.io", nodes[1].blob_url(REPO, &blob.digest));

    // A request marked as a peer's without the secret, or with a wrong one.
    let r = raw_request_with(nodes[1].addr, &url, &[("x-stowage-hop", "http://x:1")]).await;
    r.assert_oci_error(401, &["UNAUTHORIZED"], "no secret");
    let r = raw_request_with(
        nodes[1].addr,
        &url,
        &[
            ("x-stowage-hop", "http://x:1"),
            (
                "x-stowage-cluster-secret",
                "0123456789abcdef0123456789abcdeX",
            ),
        ],
    )
    .await;
    r.assert_oci_error(403, &["DENIED"], "wrong secret");
    assert_eq!(
        metric(
            &nodes[1],
            "stowage_peer_requests_received_total",
            &[("result", "refused")]
        )
        .await,
        2.0
    );
    assert_eq!(up.total(), 0, "refused before anything was asked");
    // The secret stands for client credentials on the peer path...
    let r = raw_request_with(
        nodes[1].addr,
        &url,
        &[
            ("x-stowage-hop", "http://x:1"),
            (
                "x-stowage-cluster-secret",
                "0123456789abcdef0123456789abcdef",
            ),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256_digest(&r.body), blob.digest);
    // ...and clients still need theirs.
    let r = raw_request_with(nodes[0].addr, &nodes[0].blob_url(REPO, &blob.digest), &[]).await;
    r.assert_oci_error(401, &["UNAUTHORIZED"], "client without credentials");
    // Nodes sharing the secret work together: node 0 asks node 1.
    let other = blob_owned_by(&urls, 1, 40_000);
    up.add_blob(other.data.clone());
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:pw")
    );
    let r = raw_request_with(
        nodes[0].addr,
        &nodes[0].blob_url(REPO, &other.digest),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(sha256_digest(&r.body), other.digest);
    assert_eq!(
        metric(&nodes[0], "stowage_owner_hops_total", &[]).await,
        1.0
    );
    assert_eq!(
        metric(
            &nodes[0],
            "stowage_upstream_requests_total",
            &[("kind", "blob")]
        )
        .await,
        0.0,
        "node 0 did not go upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_another_secret_is_skipped_and_the_client_served() {
    let up = FakeUpstream::start().await;
    let files = TempDir::new().unwrap();
    let urls = node_urls(2);
    let nodes = start_cluster_nodes(&urls, &urls, &up.url(), "", |i| {
        secret_line(
            files.path(),
            &format!("s{i}"),
            &format!("secret-of-node-{i}-xxxxxxxx"),
        )
    })
    .await;
    let blob = blob_owned_by(&urls, 1, 40_000);
    up.add_blob(blob.data.clone());
    let (status, body) = get_with(&nodes[0].blob_url(REPO, &blob.digest), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), blob.digest);
    assert_eq!(up.blob_gets(&blob.digest), 1, "node 0 went upstream itself");
    assert_eq!(
        metric(&nodes[0], "stowage_cluster_peers", &[("state", "down")]).await,
        1.0,
        "the refusing peer is set aside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_from_a_lying_peer_is_refused_and_fetched_upstream() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "", |_| String::new()).await;
    let n = &nodes[0];
    // A tag the fake peer owns, which it serves corrupted.
    let (img, tag) = (make_image(Format::Oci, &[100]), tag_owned_by(&urls, 1));
    up.push_image(REPO, &tag, &img);
    peer.push_image(REPO, &tag, &img);
    peer.corrupt(&sha256_digest(&img.manifest));
    let c = client();
    check_manifest(&c, n, REPO, &tag, &img.manifest, img.media_type.as_str()).await;
    assert_eq!(peer.manifest_gets(REPO, &tag), 1);
    assert_eq!(up.manifest_gets(REPO, &tag), 1, "fetched upstream instead");
    assert_eq!(
        metric(
            n,
            "stowage_digest_mismatches_total",
            &[("kind", "manifest")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_stalling_mid_manifest_is_set_aside_and_upstream_asked() {
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let urls = vec![me.clone(), peer.url()];
    // The peer client waits for a head up to the upstream timeout + 5 s; a
    // body once the head is in, up to the upstream timeout.
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "timeout = \"2s\"", |_| {
        String::new()
    })
    .await;
    let n = &nodes[0];
    // A tag the fake peer owns; it sends half the manifest, then nothing.
    let (img, tag) = (make_image(Format::Oci, &[100]), tag_owned_by(&urls, 1));
    up.push_image(REPO, &tag, &img);
    peer.push_image(REPO, &tag, &img);
    peer.fault(&sha256_digest(&img.manifest), BodyFault::StallMidBody);
    let c = client();
    within(
        15,
        "a tag whose owner stalls mid-body",
        check_manifest(&c, n, REPO, &tag, &img.manifest, img.media_type.as_str()),
    )
    .await;
    assert_eq!(peer.manifest_gets(REPO, &tag), 1);
    assert_eq!(up.manifest_gets(REPO, &tag), 1, "fetched upstream instead");
    assert_eq!(
        metric(n, "stowage_cluster_peers", &[("state", "down")]).await,
        1.0,
        "the stalling peer is set aside"
    );
}

/// A node whose peer list names it under another URL than `advertise`
/// (here `localhost` for `127.0.0.1`) asks itself for the digests that name
/// "owns": it refuses its own hop at once, so the fill goes upstream
/// instead of waiting on itself for the peer timeout (2 s + 5 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_listed_under_another_url_does_not_wait_on_itself() {
    let up = FakeUpstream::start().await;
    let me = format!("http://127.0.0.1:{}", free_port());
    let alias = me.replace("127.0.0.1", "localhost");
    let urls = vec![me.clone(), alias];
    let nodes = start_cluster_nodes(&[me], &urls, &up.url(), "timeout = \"2s\"", |_| {
        String::new()
    })
    .await;
    let blob = blob_owned_by(&urls, 1, 1000);
    up.add_blob(blob.data.clone());
    let started = std::time::Instant::now();
    let (status, body) = get_with(&nodes[0].blob_url(REPO, &blob.digest), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body.unwrap()), blob.digest);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?} on itself",
        started.elapsed()
    );
    assert_eq!(up.blob_gets(&blob.digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_tags_are_served_with_the_owner_and_upstream_down() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[100]);
    let urls = node_urls(2);
    let tag = tag_owned_by(&urls, 1);
    up.push_image(REPO, &tag, &img);
    let mut nodes = start_cluster_nodes(&urls, &urls, &up.url(), "tag_ttl = \"1s\"", |_| {
        String::new()
    })
    .await;
    let c = client();
    check_manifest(
        &c,
        &nodes[0],
        REPO,
        &tag,
        &img.manifest,
        img.media_type.as_str(),
    )
    .await;
    assert_eq!(
        metric(&nodes[0], "stowage_owner_hops_total", &[("kind", "tag")]).await,
        1.0
    );
    // The owner goes away, upstream fails.
    let owner = nodes.remove(1);
    owner.stop().await;
    up.set_failure(Failure::Unavailable);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (h, body) = get_ok(&c, &nodes[0].manifest_url(REPO, &tag)).await;
    assert_eq!(&body[..], &img.manifest[..]);
    assert_eq!(
        h.get("x-stowage-cache").and_then(|v| v.to_str().ok()),
        Some("stale")
    );
}

/// GET `url` (absolute) at `addr` with extra headers, over a fresh
/// connection.
async fn raw_request_with(
    addr: std::net::SocketAddr,
    url: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let _ = addr;
    let r = within(30, url, req.send()).await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let body = r.bytes().await.unwrap_or_default();
    RawResponse {
        status,
        headers: h,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_talk_over_mutual_tls() {
    use common::tls::{Ca, tls_table, write_pair};
    let up = FakeUpstream::start().await;
    let ca = Ca::new("stowage test CA");
    let files = TempDir::new().unwrap();
    let (cert, key) = write_pair(files.path(), &ca.server("node", 1));
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let client = ca.client("node");
    let client_cert = files.path().join("client.crt");
    let client_key = files.path().join("client.key");
    std::fs::write(&client_cert, &client.cert_pem).unwrap();
    std::fs::write(&client_key, &client.key_pem).unwrap();
    // Every node requires client certificates; peers present theirs.
    let urls: Vec<String> = free_ports(2)
        .into_iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let extra = format!(
        "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n{}",
        ca_file.to_str().unwrap(),
        client_cert.to_str().unwrap(),
        client_key.to_str().unwrap(),
        tls_table(
            &cert,
            &key,
            &format!("client_ca = {:?}", ca_file.to_str().unwrap())
        ),
    );
    let nodes = start_cluster_nodes(&urls, &urls, &up.url(), "", |_| extra.clone()).await;
    let blob = blob_owned_by(&urls, 1, 200_000);
    up.add_blob(blob.data.clone());
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", client.cert_pem, client.key_pem).as_bytes())
            .unwrap();
    let c = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .identity(identity)
        .build()
        .unwrap();
    let url = format!("{}/v2/{REPO}/blobs/{}", urls[0], blob.digest);
    let r = within(30, "GET over TLS", c.get(&url).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), blob.digest);
    assert_eq!(up.blob_gets(&blob.digest), 1);
    assert_eq!(
        metric(
            &nodes[0],
            "stowage_peer_requests_total",
            &[("result", "ok")]
        )
        .await,
        1.0,
        "node 0 asked node 1 over mutual TLS"
    );
    assert_eq!(
        metric(
            &nodes[1],
            "stowage_upstream_requests_total",
            &[("kind", "blob")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_dns_is_resolved_into_the_peer_set() {
    // peers_dns = localhost:<the fake peer's port>: resolved to 127.0.0.1,
    // that is the fake peer, which then owns about half the keys.
    let up = FakeUpstream::start().await;
    let peer = FakeUpstream::start().await;
    let port = free_port();
    let me = format!("http://127.0.0.1:{port}");
    let dir = TempDir::new().unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {:?}\n\
         [[upstream]]\nhost = \"docker.io\"\nurl = \"{}\"\n\
         [cluster]\nadvertise = \"{me}\"\npeers_dns = \"localhost:{}\"\ndns_interval = \"100ms\"\n",
        dir.path().to_str().unwrap(),
        up.url(),
        peer.addr().port()
    );
    let st = start_stowage_toml(dir, &toml).await;
    let mut body = String::new();
    for _ in 0..50 {
        body = client()
            .get(st.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains("cluster: 2 node(s)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(body.contains("cluster: 2 node(s)"), "{body}");
    let urls = vec![me, peer.url()];
    let blob = blob_owned_by(&urls, 1, 10_000);
    peer.add_blob(blob.data.clone());
    up.add_blob(blob.data.clone());
    check_blob(&client(), &st, REPO, &blob).await;
    assert_eq!(peer.blob_gets(&blob.digest), 1, "asked the peer DNS found");
    assert_eq!(up.blob_gets(&blob.digest), 0);
}

/// A passthrough upstream next to a mirror-mode one in a cluster: what the
/// owner of a private image pulled through one node (passthrough callers
/// are served by each node on its own) is not served to a mirror-mode
/// client of another node, whose miss goes to that node as the digest's
/// owner: the owner refuses it as private, and the answer is the
/// mirror-mode upstream's 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_content_does_not_reach_another_node_through_a_mirror_mode_upstream() {
    let private_up = FakeUpstream::start().await;
    private_up.enable_auth(300);
    private_up.set_credentials("owner", "pw");
    private_up.set_private("acme/private");
    private_up.set_strict_repos(true);
    let img = make_image(Format::Oci, &[50_000]);
    private_up.push_image("acme/private", "v1", &img);
    let public_up = FakeUpstream::start().await;
    public_up.set_strict_repos(true);
    let urls = node_urls(2);
    let extra = format!(
        "\n[[upstream]]\nhost = \"private.example\"\nurl = \"{}\"\nauth = \"passthrough\"\n",
        private_up.url()
    );
    let nodes =
        start_cluster_nodes(&urls, &urls, &public_up.url(), &extra, |_| String::new()).await;
    let layer = &img.layers[0];
    let owner = owner_of_digest(&urls, &layer.digest);
    let other = 1 - owner;
    let token: serde_json::Value = client()
        .get(format!(
            "{}/token?service=fake&scope=repository:acme/private:pull",
            private_up.url()
        ))
        .basic_auth("owner", Some("pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = format!("Bearer {}", token["token"].as_str().unwrap());
    let via_owner = nodes[owner].v2(&format!(
        "private.example/acme/private/blobs/{}",
        layer.digest
    ));
    let (status, body) = get_with(&via_owner, &[("authorization", auth.as_str())]).await;
    assert_eq!(
        (status, sha256_digest(&body.unwrap())),
        (200, layer.digest.clone())
    );
    wait_stored(&nodes[owner], &layer.digest).await;
    for node in [other, owner] {
        let url = nodes[node].v2(&format!("docker.io/library/alpine/blobs/{}", layer.digest));
        let (status, _) = get_with(&url, &[]).await;
        assert_eq!(
            status, 404,
            "node {node}: private blob served through docker.io"
        );
    }
    assert!(!stored(&nodes[other], &layer.digest));
    assert_eq!(private_up.blob_gets(&layer.digest), 1);
}
