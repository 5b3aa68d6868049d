//! Prometheus metrics at the admin listener's `/metrics`: after scripted
//! pulls the counters have exactly the expected values, and they agree with
//! what the fake upstream saw.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// One scrape: series (`name{k="v",...}`) to value.
struct Scrape {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match key.split_once('{') {
                None => (key.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect("closing brace");
                    let labels = rest
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            series.push((name, labels, value));
        }
        Scrape {
            series,
            text: text.to_string(),
        }
    }

    /// Sum of the series named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Like [`Scrape::sum`], as an integer.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.sum(name, labels) as u64
    }

    /// Label sets present for `name`.
    fn label_sets(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.series
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, _)| l.clone())
            .collect()
    }
}

async fn scrape(st: &Stowage) -> Scrape {
    let r = within(10, "scrape", client().get(st.admin_url("/metrics")).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    Scrape::parse(&r.text().await.unwrap())
}

/// Scrapes until `name{labels}` equals `want` (values counted when a
/// response body ends may trail the client by a moment), then returns that
/// scrape. Fails after 10 s.
async fn scrape_when(st: &Stowage, name: &str, labels: &[(&str, &str)], want: u64) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(st).await;
        let got = s.get(name, labels);
        if got == want {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{name}{labels:?} is {got}, expected {want}:\n{}", s.text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_status(url: &str) -> (u16, Result<bytes::Bytes, reqwest::Error>) {
    let r = within(30, url, client().get(url).send()).await.unwrap();
    (r.status().as_u16(), r.bytes().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripted_pull_exact_counters() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[3000, 200_000]);
    up.push_image("library/alpine", "3.20", &img);
    let big = Blob::random(1 << 20);
    up.add_blob(big.data.clone());
    // Exact counts of what the pull itself causes: no prefetch.
    let st = start_stowage_no_prefetch(&up.url(), "").await;
    let c = client();
    let blobs = img.blobs();
    let blob_bytes: u64 = blobs.iter().map(|b| b.len() as u64).sum();
    let manifest_bytes = img.manifest.len() as u64;

    // Nothing yet: the families exist once a request was counted.
    let s = scrape(&st).await;
    assert_eq!(s.get("stowage_cache_requests_total", &[]), 0);
    assert_eq!(s.get("stowage_blob_fills_in_flight", &[]), 0);

    // Cold pull: manifest by tag, then every blob.
    let (_, body) = get_ok(&c, &st.manifest_url("alpine", "3.20")).await;
    assert_eq!(body, img.manifest);
    for b in &blobs {
        let (_, body) = get_ok(&c, &st.blob_url("alpine", &b.digest)).await;
        assert_eq!(body, b.data);
    }

    // Clients finish at verification; let the fills commit (fsync, rename).
    let hooks = st.hooks.clone();
    within(10, "fills committed", async {
        while hooks.fills_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Warm pull: tag, digest, every blob, and a HEAD.
    get_ok(&c, &st.manifest_url("alpine", "3.20")).await;
    get_ok(&c, &st.manifest_url("alpine", &img.digest)).await;
    for b in &blobs {
        get_ok(&c, &st.blob_url("alpine", &b.digest)).await;
    }
    let r = c
        .head(st.blob_url("alpine", &blobs[0].digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // 8 concurrent cold requests of one blob, held upstream until all 8
    // have their response headers: one fill, seven joins.
    let hold = up.hold(&big.digest);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(8);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (url, big, tx) = (st.blob_url("alpine", &big.digest), big.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "client {i}");
            tx.send(()).await.unwrap();
            let body = r
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(sha256_digest(&body), big.digest, "client {i}");
        }));
    }
    within(20, "8 response headers", async {
        for _ in 0..8 {
            rx.recv().await.unwrap();
        }
    })
    .await;
    // While held: one fill in flight.
    let s = scrape(&st).await;
    assert_eq!(s.get("stowage_blob_fills_in_flight", &[]), 1, "{}", s.text);
    assert!(
        s.get("stowage_http_requests_in_flight", &[]) >= 8,
        "{}",
        s.text
    );
    hold.release();
    for t in tasks {
        within(30, "8 concurrent readers", t).await.unwrap();
    }

    // Upstream saw exactly: one manifest GET, one GET per blob.
    assert_eq!(up.total(), 1 + blobs.len() + 1, "{:?}", up.requests());

    let upstream_bytes = manifest_bytes + blob_bytes + 8 * big.len() as u64;
    let cache_bytes = 2 * manifest_bytes + blob_bytes;
    scrape_when(&st, "stowage_http_requests_in_flight", &[], 0).await;
    let s = scrape_when(
        &st,
        "stowage_served_bytes_total",
        &[("source", "upstream")],
        upstream_bytes,
    )
    .await;
    let t = &s.text;

    let cache = |kind, outcome| {
        s.get(
            "stowage_cache_requests_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    assert_eq!(cache("manifest", "miss"), 1, "{t}");
    assert_eq!(cache("manifest", "hit"), 2, "{t}");
    assert_eq!(cache("blob", "miss"), blobs.len() as u64 + 1, "{t}");
    assert_eq!(cache("blob", "hit"), blobs.len() as u64 + 1, "{t}");
    assert_eq!(cache("blob", "join"), 7, "{t}");
    assert_eq!(
        s.get("stowage_cache_requests_total", &[]),
        1 + 2 + (blobs.len() as u64 + 1) * 2 + 7,
        "no other outcomes: {t}"
    );

    // Upstream requests agree with the fake, by kind and status.
    let upstream = |kind, status| {
        s.get(
            "stowage_upstream_requests_total",
            &[
                ("upstream", "docker.io"),
                ("kind", kind),
                ("status", status),
            ],
        )
    };
    assert_eq!(upstream("manifest", "200"), 1, "{t}");
    assert_eq!(upstream("blob", "200"), blobs.len() as u64 + 1, "{t}");
    assert_eq!(
        s.get("stowage_upstream_requests_total", &[]),
        up.total() as u64,
        "{t}"
    );
    assert_eq!(
        s.get("stowage_upstream_request_duration_seconds_count", &[]),
        up.total() as u64,
        "{t}"
    );

    // Fills.
    assert_eq!(s.get("stowage_blob_fills_in_flight", &[]), 0, "{t}");
    assert_eq!(
        s.get("stowage_blob_fills_total", &[("result", "ok")]),
        blobs.len() as u64 + 1,
        "{t}"
    );
    assert_eq!(
        s.get("stowage_blob_fills_total", &[]),
        blobs.len() as u64 + 1
    );
    assert_eq!(
        s.get("stowage_blob_fill_bytes_total", &[]),
        blob_bytes + big.len() as u64
    );
    assert_eq!(s.get("stowage_digest_mismatches_total", &[]), 0);
    assert_eq!(s.get("stowage_manifest_stale_served_total", &[]), 0);

    // Client requests by route, method and status.
    let http = |route, method| {
        s.get(
            "stowage_http_requests_total",
            &[("route", route), ("method", method), ("status", "200")],
        )
    };
    assert_eq!(http("manifest", "GET"), 3, "{t}");
    assert_eq!(http("blob", "GET"), 2 * blobs.len() as u64 + 8, "{t}");
    assert_eq!(http("blob", "HEAD"), 1, "{t}");
    assert_eq!(
        s.get("stowage_http_requests_total", &[]),
        3 + 2 * blobs.len() as u64 + 9
    );
    assert_eq!(
        s.get("stowage_http_request_duration_seconds_count", &[]),
        3 + 2 * blobs.len() as u64 + 9
    );

    // Bytes by source.
    assert_eq!(
        s.get("stowage_served_bytes_total", &[("source", "cache")]),
        cache_bytes,
        "{t}"
    );
    assert_eq!(
        s.get("stowage_served_bytes_total", &[("source", "local")]),
        0
    );

    // Bounded labels: nothing names a repository or digest.
    for (name, labels, _) in &s.series {
        for v in labels.values() {
            assert!(
                !v.contains("alpine") && !v.contains("sha256"),
                "{name} has an unbounded label value {v}"
            );
        }
    }
    // Process metrics come along.
    assert!(s.sum("process_resident_memory_bytes", &[]) > 0.0, "{t}");
    assert_eq!(
        s.label_sets("stowage_build_info")[0]
            .get("version")
            .map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digest_mismatches_are_counted() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(100_000);
    up.add_blob(blob.data.clone());
    up.corrupt(&blob.digest);
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/bad", "1", &img);
    up.corrupt(&img.digest);
    let st = start_stowage(&up.url(), "").await;

    // The blob fails: mid-body, before the response head went out (the
    // connection is cut: hyper sends the head with the first body bytes),
    // or (when the fill failed before the response started) with an error
    // status. Never a complete 200.
    let url = st.blob_url("library/bad", &blob.digest);
    match within(30, &url, client().get(&url).send()).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.bytes().await;
            assert!(
                status == 502 || (status == 200 && body.is_err()),
                "a corrupt blob completed: {status}"
            );
        }
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // The manifest by digest is refused outright.
    let (status, _) = get_status(&st.manifest_url("library/bad", &img.digest)).await;
    assert_eq!(status, 502);

    let s = scrape_when(&st, "stowage_blob_fills_total", &[("result", "failed")], 1).await;
    assert_eq!(
        s.get("stowage_digest_mismatches_total", &[("kind", "blob")]),
        1,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("stowage_digest_mismatches_total", &[("kind", "manifest")]),
        1
    );
    assert_eq!(s.get("stowage_blob_fills_in_flight", &[]), 0);
    assert_eq!(s.get("stowage_blob_fill_bytes_total", &[]), 0);
    assert_eq!(
        s.get(
            "stowage_http_requests_total",
            &[("route", "manifest"), ("status", "502")]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_manifests_are_counted() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/redis", "7", &img);
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let url = st.manifest_url("redis", "7");

    get_ok(&client(), &url).await;
    up.set_failure(Failure::Unavailable);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Upstream answers the revalidation with 503: served stale, twice
    // (the second within the stale retry window, without asking again).
    for _ in 0..2 {
        let (_, body) = get_ok(&client(), &url).await;
        assert_eq!(body, img.manifest);
    }
    let s = scrape_when(
        &st,
        "stowage_served_bytes_total",
        &[("source", "cache")],
        2 * img.manifest.len() as u64,
    )
    .await;
    assert_eq!(
        s.get("stowage_manifest_stale_served_total", &[]),
        2,
        "{}",
        s.text
    );
    assert_eq!(
        s.get(
            "stowage_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "stale")]
        ),
        2
    );
    assert_eq!(
        s.get(
            "stowage_upstream_requests_total",
            &[("kind", "manifest"), ("status", "503")]
        ),
        1,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("stowage_upstream_requests_total", &[]),
        up.total() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_requests_are_counted() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    let img = make_image(Format::Oci, &[1000]);
    up.push_image("library/nginx", "1", &img);
    let st = start_stowage(&up.url(), "").await;
    pull_image(&client(), &st, "nginx", "1", &img).await;

    let s = scrape_when(&st, "stowage_http_requests_in_flight", &[], 0).await;
    assert!(up.token_requests() >= 1);
    assert_eq!(
        s.get("stowage_upstream_requests_total", &[("kind", "token")]),
        up.token_requests() as u64,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("stowage_upstream_requests_total", &[]),
        up.total() as u64,
        "{}",
        s.text
    );
    assert!(
        s.get(
            "stowage_upstream_requests_total",
            &[("kind", "manifest"), ("status", "401")]
        ) >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_upstream_and_other_routes() {
    let st = start_stowage(&dead_url().await, "").await;
    let c = client();
    let r = c
        .get(st.manifest_url("alpine", "latest"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    c.get(st.v2("")).send().await.unwrap();
    c.post(st.v2("x/blobs/uploads/")).send().await.unwrap();
    c.get(st.v2("x/tags/list")).send().await.unwrap();

    let s = scrape_when(&st, "stowage_http_requests_in_flight", &[], 0).await;
    let t = &s.text;
    assert_eq!(
        s.get(
            "stowage_upstream_requests_total",
            &[("kind", "manifest"), ("status", "error")]
        ),
        1,
        "{t}"
    );
    assert_eq!(
        s.get(
            "stowage_http_requests_total",
            &[("route", "base"), ("method", "GET"), ("status", "200")]
        ),
        1,
        "{t}"
    );
    assert_eq!(
        s.get(
            "stowage_http_requests_total",
            &[("route", "other"), ("method", "POST"), ("status", "405")]
        ),
        1,
        "{t}"
    );
    assert_eq!(
        s.get("stowage_http_requests_total", &[("route", "tags")]),
        1,
        "{t}"
    );
    // Failed requests are no cache outcome.
    assert_eq!(s.get("stowage_cache_requests_total", &[]), 0, "{t}");
    assert!(s.get("stowage_served_bytes_total", &[("source", "local")]) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_ids() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    let c = client();

    let a = c.get(st.v2("")).send().await.unwrap();
    let b = c.get(st.v2("")).send().await.unwrap();
    let (a, b) = (
        header(&a, "x-request-id").expect("x-request-id"),
        header(&b, "x-request-id").expect("x-request-id"),
    );
    assert_ne!(a, b);
    assert!(
        a.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-'),
        "{a}"
    );

    // A sane incoming id is kept, also on errors; an insane one replaced.
    let r = c
        .get(st.v2("nope/manifests/@@"))
        .header("x-request-id", "lb-1234.abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-request-id").as_deref(), Some("lb-1234.abc"));
    let r = c
        .get(st.v2(""))
        .header("x-request-id", "has spaces and \"quotes\"")
        .send()
        .await
        .unwrap();
    let id = header(&r, "x-request-id").unwrap();
    assert!(!id.contains(' '), "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_size_budget_and_evictions() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Blob> = (0..3).map(|_| Blob::random(400 * 1024)).collect();
    for b in &blobs {
        up.add_blob(b.data.clone());
    }
    let dir = tempfile::TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "") + "\n[cache]\nmax_size = \"1MiB\"\n";
    let st = start_stowage_toml(dir, &toml).await;
    let c = client();

    get_ok(&c, &st.blob_url("library/a", &blobs[0].digest)).await;
    let s = scrape_when(&st, "stowage_cache_size_bytes", &[], blobs[0].len() as u64).await;
    assert_eq!(
        s.get("stowage_cache_budget_bytes", &[]),
        1 << 20,
        "{}",
        s.text
    );
    assert_eq!(s.get("stowage_cache_evictions_total", &[]), 0);

    // Past the high watermark: the least recently used blob goes.
    for b in &blobs[1..] {
        get_ok(&c, &st.blob_url("library/a", &b.digest)).await;
    }
    let s = scrape_when(&st, "stowage_cache_evictions_total", &[], 1).await;
    assert_eq!(
        s.get("stowage_cache_evicted_bytes_total", &[]),
        blobs[0].len() as u64,
        "{}",
        s.text
    );
    assert_eq!(
        s.get("stowage_cache_size_bytes", &[]),
        2 * blobs[0].len() as u64,
        "{}",
        s.text
    );
}
