//! Blob cache fills: single upstream fetch for concurrent clients, live
//! streaming to joiners, verification, client disconnects, ranges, HEAD.

mod common;

use std::time::Duration;

use common::*;

const MIB: usize = 1 << 20;

async fn setup(sizes: &[usize]) -> (FakeUpstream, Stowage, Vec<Blob>) {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Blob> = sizes.iter().map(|n| Blob::random(*n)).collect();
    for b in &blobs {
        up.add_blob(b.data.clone());
    }
    let st = start_stowage(&up.url(), "").await;
    (up, st, blobs)
}

/// Reads a body to the end, hashing it. `Err` when the transfer failed.
async fn read_all(mut r: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut v = Vec::new();
    while let Some(ch) = r.chunk().await? {
        v.extend_from_slice(&ch);
    }
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gets_of_uncached_blob_fetch_once() {
    let (up, st, blobs) = setup(&[8 * MIB]).await;
    let b = blobs[0].clone();
    let url = st.blob_url("library/big", &b.digest);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (url, b, barrier) = (url.clone(), b.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            let r = c
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(r.status(), 200, "client {i}");
            assert_eq!(
                header(&r, "docker-content-digest").as_deref(),
                Some(b.digest.as_str()),
                "client {i}"
            );
            let body = read_all(r)
                .await
                .unwrap_or_else(|e| panic!("client {i}: body: {e}"));
            assert_eq!(body.len(), b.len(), "client {i}: length");
            // Same bytes as the blob whose digest is b.digest (memcmp is far
            // cheaper than 32 unoptimised SHA-256 passes).
            assert!(
                body[..] == b.data[..],
                "client {i}: bytes differ from the blob"
            );
        }));
    }
    for t in tasks {
        within(60, "32 concurrent clients", t).await.unwrap();
    }
    assert_eq!(
        up.blob_gets(&b.digest),
        1,
        "upstream GETs for 32 concurrent clients"
    );
    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), b.digest);
    assert_eq!(up.blob_gets(&b.digest), 1, "upstream GETs after cached GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_gets_join_one_held_fill() {
    let (up, st, blobs) = setup(&[8 * MIB]).await;
    let b = blobs[0].clone();
    let hold = up.hold(&b.digest);
    let url = st.blob_url("library/big", &b.digest);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(64);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (url, b, tx) = (url.clone(), b.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = client()
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(r.status(), 200, "client {i}");
            tx.send(i).await.unwrap();
            let body = read_all(r)
                .await
                .unwrap_or_else(|e| panic!("client {i}: body: {e}"));
            assert!(
                body[..] == b.data[..],
                "client {i}: bytes differ from the blob"
            );
        }));
    }
    // All 32 have their response headers while upstream is still holding.
    within(
        20,
        "32 response headers while the fill is in progress",
        async {
            for _ in 0..32 {
                rx.recv().await.unwrap();
            }
        },
    )
    .await;
    hold.wait_half_sent(1).await;
    assert_eq!(hold.completed(), 0);
    hold.release();
    for t in tasks {
        within(60, "32 joined clients", t).await.unwrap();
    }
    assert_eq!(
        up.blob_gets(&b.digest),
        1,
        "upstream GETs for 32 concurrent clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_joiner_receives_bytes_before_fill_completes() {
    let (up, st, blobs) = setup(&[8 * MIB]).await;
    let b = blobs[0].clone();
    let half = b.len() / 2;
    let hold = up.hold(&b.digest);
    let url = st.blob_url("library/big", &b.digest);

    // Client A starts the fill and reads everything it can.
    let a = {
        let url = url.clone();
        tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "client A");
            read_all(r).await
        })
    };
    hold.wait_half_sent(1).await;

    // Client B arrives while upstream holds after the first half.
    let mut r = within(10, "client B response headers", client().get(&url).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "client B");
    let mut got = Vec::new();
    // B must see (nearly) the first half while upstream is still holding.
    let slack = 512 * 1024;
    within(
        10,
        "client B receiving the first half before upstream resumes",
        async {
            while got.len() < half - slack {
                let ch = r.chunk().await.unwrap().expect("client B body ended early");
                got.extend_from_slice(&ch);
            }
        },
    )
    .await;
    assert_eq!(hold.completed(), 0, "upstream must still be holding");
    assert!(
        got.len() <= half,
        "client B got {} bytes, upstream sent only {half}",
        got.len()
    );
    assert_eq!(&got[..], &b.data[..got.len()], "client B: first bytes");

    hold.release();
    while let Some(ch) = within(30, "client B rest", r.chunk()).await.unwrap() {
        got.extend_from_slice(&ch);
    }
    assert_eq!(sha256_digest(&got), b.digest, "client B: digest");
    let body_a = within(30, "client A", a)
        .await
        .unwrap()
        .expect("client A body");
    assert_eq!(sha256_digest(&body_a), b.digest, "client A: digest");
    assert_eq!(up.blob_gets(&b.digest), 1, "upstream GETs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_upstream_blob_fails_every_client_and_is_not_cached() {
    let (up, st, blobs) = setup(&[2 * MIB]).await;
    let b = blobs[0].clone();
    up.corrupt(&b.digest);
    let hold = up.hold(&b.digest);
    let url = st.blob_url("library/bad", &b.digest);

    // Three clients share one (held, corrupt) fill.
    let mut tasks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(8);
    for i in 0..3 {
        let (url, tx) = (url.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = client()
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            let status = r.status();
            tx.send(()).await.unwrap();
            (status, read_all(r).await)
        }));
        if i == 0 {
            hold.wait_half_sent(1).await;
        }
    }
    within(20, "headers of clients sharing the corrupt fill", async {
        for _ in 0..3 {
            rx.recv().await.unwrap();
        }
    })
    .await;
    hold.release();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = within(30, "clients of the corrupt fill", t).await.unwrap();
        assert_corrupt_fill_failed(i, status, body, &b);
    }
    up.unhold(&b.digest);

    // Unheld, single client, same again.
    let r = client().get(&url).send().await.unwrap();
    let status = r.status();
    assert_corrupt_fill_failed(99, status, read_all(r).await, &b);
    assert_eq!(
        up.blob_gets(&b.digest),
        2,
        "each failed fill must have fetched upstream"
    );

    // Nothing was cached: once upstream is healthy, stowage fetches again.
    up.uncorrupt(&b.digest);
    let (h, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), b.digest);
    assert_eq!(
        h.get("content-length").unwrap().to_str().unwrap(),
        b.len().to_string()
    );
    assert_eq!(
        up.blob_gets(&b.digest),
        3,
        "corrupt bytes must not have been cached"
    );
}

/// A client of a corrupt fill must not get a clean, complete 200: either an
/// error status, or a 200 whose body transfer fails.
fn assert_corrupt_fill_failed(
    i: usize,
    status: reqwest::StatusCode,
    body: Result<Vec<u8>, reqwest::Error>,
    b: &Blob,
) {
    if status.is_success() {
        match body {
            Err(_) => {}
            Ok(v) => panic!(
                "client {i}: corrupt upstream blob delivered as a clean {status} body of {} bytes \
                 (digest {}, expected {}): the transfer must fail",
                v.len(),
                sha256_digest(&v),
                b.digest
            ),
        }
    } else {
        assert!(
            status.is_server_error(),
            "client {i}: status {status} for a corrupt upstream blob"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_upstream_blob_fails_and_is_not_cached() {
    let (up, st, blobs) = setup(&[2 * MIB]).await;
    let b = blobs[0].clone();
    up.truncate(&b.digest);
    let url = st.blob_url("library/cut", &b.digest);
    for round in 0..2 {
        let r = client().get(&url).send().await.unwrap();
        let status = r.status();
        assert_corrupt_fill_failed(round, status, read_all(r).await, &b);
        assert_eq!(
            up.blob_gets(&b.digest),
            round + 1,
            "truncated blob was cached"
        );
    }
    up.untruncate(&b.digest);
    let c = client();
    check_blob(&c, &st, "library/cut", &b).await;
    assert_eq!(up.blob_gets(&b.digest), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_disconnect_does_not_abort_fill() {
    let (up, st, blobs) = setup(&[4 * MIB]).await;
    let b = blobs[0].clone();
    let hold = up.hold(&b.digest);
    let url = st.blob_url("library/gone", &b.digest);

    let mut r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    hold.wait_half_sent(1).await;
    let first = within(10, "first chunk", r.chunk())
        .await
        .unwrap()
        .expect("no data");
    assert!(!first.is_empty());
    drop(r); // client gone mid-fill
    // Give stowage a moment to notice the disconnect before upstream resumes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    hold.release();
    hold.wait_completed(1).await;
    assert_eq!(
        hold.dropped(),
        0,
        "stowage dropped the upstream body when the client went away"
    );

    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), b.digest);
    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), b.digest);
    assert_eq!(
        up.blob_gets(&b.digest),
        1,
        "the abandoned fill must still have been cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_upstream_blob_is_cached() {
    let (up, st, blobs) = setup(&[3 * MIB + 17]).await;
    let b = blobs[0].clone();
    up.set_chunked(true);
    let url = st.blob_url("library/chunky", &b.digest);
    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), b.digest);
    let c = client();
    check_blob(&c, &st, "library/chunky", &b).await;
    assert_eq!(up.blob_gets(&b.digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_requests_on_cached_blob() {
    let (up, st, blobs) = setup(&[1000]).await;
    let b = blobs[0].clone();
    let size = b.len();
    let url = st.blob_url("library/ranged", &b.digest);
    let c = client();
    get_ok(&c, &url).await;

    let cases: [(&str, usize, usize); 4] = [
        ("bytes=0-9", 0, 9),
        ("bytes=-5", size - 5, size - 1),
        ("bytes=10-", 10, size - 1),
        ("bytes=990-5000", 990, size - 1),
    ];
    for (range, s, e) in cases {
        let r = c.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {s}-{e}/{size}")),
            "{range}"
        );
        assert_eq!(
            header(&r, "content-length"),
            Some((e - s + 1).to_string()),
            "{range}"
        );
        assert_eq!(r.bytes().await.unwrap(), b.data.slice(s..=e), "{range}");
    }
    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
    ] {
        let r = c.get(&url).header("range", &range).send().await.unwrap();
        assert_eq!(r.status(), 416, "{range}");
    }
    assert_eq!(
        up.blob_gets(&b.digest),
        1,
        "ranges on a cached blob went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_of_uncached_blob_asks_upstream_without_filling() {
    let (up, st, blobs) = setup(&[123_456]).await;
    let b = blobs[0].clone();
    let url = st.blob_url("library/headonly", &b.digest);
    let c = client();
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some(b.len().to_string()));
    assert_eq!(header(&r, "docker-content-digest"), Some(b.digest.clone()));
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(up.blob_heads(&b.digest), 1, "upstream HEADs");
    // A fill started in the background would show up shortly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.blob_gets(&b.digest), 0, "HEAD started a fill");

    check_blob(&c, &st, "library/headonly", &b).await;
    assert_eq!(up.blob_gets(&b.digest), 1);
}

/// A fill is keyed by digest alone and asks upstream in the repository its
/// first request named. A request under a name upstream refuses (here: a
/// repository that does not hold the blob) leads a fill that fails; a
/// request under the right name that joined it meanwhile must still get
/// the blob, by leading a fill of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_fill_does_not_fail_requests_that_joined_it() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[50_000]);
    up.push_image("acme/app", "v1", &img);
    up.set_strict_repos(true);
    up.set_delay(Duration::from_millis(400));
    let st = start_stowage(&up.url(), "").await;
    let layer = img.layers[0].clone();
    let wrong = {
        let url = st.blob_url("evil/other", &layer.digest);
        tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
    };
    // The wrong name's fill is waiting for upstream; join it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = client()
        .get(st.blob_url("acme/app", &layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), layer.data);
    assert_eq!(wrong.await.unwrap(), 404);
    assert_eq!(up.blob_gets(&layer.digest), 2);
}

/// Fill poisoning (issue 11, item 2): a GET under a repository that lacks
/// the blob starts the fill; upstream answers 404 after a second. Eight
/// clients asking meanwhile under the right repository must all be served,
/// with one upstream GET between them; the wrong repository gets its 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repository_refusal_does_not_poison_joiners() {
    let (up, st, blobs) = setup(&[2 * MIB]).await;
    let b = blobs[0].clone();
    up.blob_only_in(&b.digest, &["team/right"]);
    let wrong_path = format!("/v2/team/wrong/blobs/{}", b.digest);
    let right_path = format!("/v2/team/right/blobs/{}", b.digest);
    up.delay(&wrong_path, Duration::from_secs(1));

    let wrong = {
        let url = st.blob_url("team/wrong", &b.digest);
        tokio::spawn(async move { client().get(&url).send().await.unwrap() })
    };
    // The wrong repository's request is at upstream: the fill is running.
    within(10, "the wrong repository's GET reaches upstream", async {
        while up.count("GET", &wrong_path) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // A second client under the wrong repository waits for the same answer.
    let wrong2 = {
        let url = st.blob_url("team/wrong", &b.digest);
        tokio::spawn(async move { client().get(&url).send().await.unwrap() })
    };
    let mut right = Vec::new();
    for i in 0..8 {
        let (url, b) = (st.blob_url("team/right", &b.digest), b.clone());
        right.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "client {i} under the right repository");
            let body = read_all(r).await.unwrap();
            assert!(body[..] == b.data[..], "client {i}: bytes");
        }));
    }
    let wrong = within(10, "the wrong repository's answer", wrong)
        .await
        .unwrap();
    assert_oci_error(wrong, 404, &["BLOB_UNKNOWN"], "the wrong repository").await;
    let wrong2 = within(10, "the second wrong client", wrong2).await.unwrap();
    assert_oci_error(
        wrong2,
        404,
        &["BLOB_UNKNOWN"],
        "the wrong repository, joined",
    )
    .await;
    for t in right {
        within(20, "clients under the right repository", t)
            .await
            .unwrap();
    }
    assert_eq!(
        up.count("GET", &right_path),
        1,
        "upstream GETs under the right repository"
    );
    assert_eq!(
        up.count("GET", &wrong_path),
        1,
        "upstream GETs under the wrong repository"
    );
    // Stored: the next request is a hit.
    let (h, _) = get_ok(&client(), &st.blob_url("team/right", &b.digest)).await;
    assert_eq!(h.get("x-stowage-cache").unwrap(), "hit");
}

/// Fills to one upstream are spread over more than one connection: over
/// h2, which multiplexes every request on one connection, concurrent fills
/// use `connections` of them (one per client of the upstream's small pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fills_use_several_connections_to_an_h2_upstream() {
    let ca = common::tls::Ca::new("fake upstream CA");
    let up = FakeUpstream::start_tls(&ca.server("localhost", 1)).await;
    let dir = tempfile::TempDir::new().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let warm: Vec<Blob> = (0..4).map(|_| Blob::random(1000)).collect();
    let blobs: Vec<Blob> = (0..8).map(|_| Blob::random(2 * MIB)).collect();
    for b in warm.iter().chain(&blobs) {
        up.add_blob(b.data.clone());
    }
    let holds: Vec<Hold> = blobs.iter().map(|b| up.hold(&b.digest)).collect();
    let extra = format!("ca_file = {ca_file:?}\nconnections = 4");
    let st = start_stowage(&up.url(), &extra).await;
    // One request after another: the connections there are to reuse.
    for b in &warm {
        check_blob(&client(), &st, "library/x", b).await;
    }
    let mut tasks = Vec::new();
    for b in &blobs {
        let (url, b) = (st.blob_url("library/x", &b.digest), b.clone());
        tasks.push(tokio::spawn(async move {
            let (_, body) = get_ok(&client(), &url).await;
            assert!(body[..] == b.data[..]);
        }));
    }
    for h in &holds {
        h.wait_half_sent(1).await;
    }
    for h in &holds {
        h.release();
    }
    for t in tasks {
        within(30, "fills over h2", t).await.unwrap();
    }
    let fills: Vec<Recorded> = up
        .requests()
        .into_iter()
        .filter(|r| blobs.iter().any(|b| r.path.ends_with(&b.digest)))
        .collect();
    assert!(
        fills.iter().all(|r| r.version == http::Version::HTTP_2),
        "the upstream was not reached over h2"
    );
    let used: std::collections::HashSet<usize> = fills.iter().map(|r| r.conn).collect();
    assert_eq!(
        used.len(),
        4,
        "8 concurrent fills used connections {used:?}"
    );
    assert_eq!(up.connections(), 4, "connections opened in all");
}

/// Shutdown takes at most `shutdown_timeout` (2 s here) in all: draining
/// the connections and letting fills commit share it. Before, each had the
/// whole of it, so a stalled fill with its client still attached made
/// shutdown take twice as long (4 s), past the grace periods deploy/ sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_takes_at_most_the_shutdown_timeout_with_a_stalled_fill() {
    let (up, st, blobs) = setup(&[4 * MIB]).await;
    let b = blobs[0].clone();
    let hold = up.hold(&b.digest);
    let r = client()
        .get(st.blob_url("library/big", &b.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    hold.wait_half_sent(1).await;
    let reader = tokio::spawn(read_all(r));

    let started = std::time::Instant::now();
    st.stop().await;
    let took = started.elapsed();
    hold.release();
    assert!(
        took < Duration::from_millis(3000),
        "shutdown took {took:?}, shutdown_timeout is 2 s"
    );
    // (The connection task outlives `stop` here, in the test's runtime: in
    // the binary the runtime ends with it. Either way no wrong byte.)
    if let Ok(body) = reader.await.unwrap() {
        assert!(body[..] == b.data[..], "bytes differ from the blob");
    }
}

/// A Range wholly within what reached the disk gets every byte, its last
/// once the rest of the blob is verified, although the disk failed past it
/// and no reader needs the rest. Before, the fill stopped as soon as its
/// only reader let go of the spill queue ("no readers left"), and the
/// range's last byte failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_on_disk_completes_when_the_disk_fails_past_it() {
    let (up, st, blobs) = setup(&[4 * MIB]).await;
    let b = &blobs[0];
    st.hooks.inject_write_failure(Some(MIB as u64));
    let r = client()
        .get(st.blob_url("library/big", &b.digest))
        .header("Range", "bytes=0-99999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    let body = within(30, "the range", r.bytes())
        .await
        .expect("the whole range");
    assert!(body[..] == b.data[..100_000], "bytes differ");
    assert_eq!(up.blob_gets(&b.digest), 1);
}

/// Fills that wait on upstream hold no thread of the blocking pool: with a
/// pool of 4 threads and 6 fills held mid-body by upstream (each with a
/// client reading), new fills still start (creating their file is a
/// blocking call) and stored blobs are still served (opening one that is
/// not kept open is too). Before, each fill's writer held a thread for the
/// whole fill: the fifth fill's response waited until a held fill failed
/// (upstream's 30 s idle timeout); in production, everything blocking
/// waited behind 512 slow fills.
#[test]
fn fills_waiting_on_upstream_leave_the_blocking_pool_to_hits() {
    small_blocking_pool().block_on(async {
        let up = FakeUpstream::start().await;
        let st = start_stowage_no_prefetch(&up.url(), "").await;
        let c = client();
        let stored = store_more_than_are_kept_open(&up, &st, &c).await;
        let held: Vec<Blob> = (0..6).map(|_| Blob::random(MIB)).collect();
        let mut readers = Vec::new();
        for (i, b) in held.iter().enumerate() {
            up.add_blob(b.data.clone());
            let hold = up.hold(&b.digest);
            // Its response starts once the fill has its temporary file:
            // a blocking call too.
            let r = within(5, "a held fill's response", async {
                c.get(st.blob_url("library/x", &b.digest))
                    .send()
                    .await
                    .unwrap()
            })
            .await;
            assert_eq!(r.status(), 200);
            hold.wait_half_sent(1).await;
            readers.push((i, r, hold));
        }
        // The writers have had time to go idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stored_blobs_are_served(&st, &c, &stored, "fills are held").await;
        for (i, r, hold) in readers {
            hold.release();
            let body = within(10, "a held fill's body", read_all(r)).await.unwrap();
            assert!(body == held[i].data, "bytes of held blob {i}");
        }
    });
}

/// A runtime whose blocking pool has 4 threads (tokio's default is 512).
fn small_blocking_pool() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Stores more blobs than the few kept open (so that serving the first
/// ones again opens their files: a blocking call).
async fn store_more_than_are_kept_open(
    up: &FakeUpstream,
    st: &Stowage,
    c: &reqwest::Client,
) -> Vec<Blob> {
    let stored: Vec<Blob> = (0..8).map(|_| Blob::random(64 * 1024)).collect();
    for b in &stored {
        up.add_blob(b.data.clone());
        let (_, body) = get_ok(c, &st.blob_url("library/x", &b.digest)).await;
        assert!(body == b.data);
    }
    stored
}

/// Each of `stored` is served within 5 s, while `what`.
async fn stored_blobs_are_served(st: &Stowage, c: &reqwest::Client, stored: &[Blob], what: &str) {
    for b in stored {
        let (_, body) = within(5, &format!("a stored blob while {what}"), async {
            get_ok(c, &st.blob_url("library/x", &b.digest)).await
        })
        .await;
        assert!(body == b.data);
    }
}

/// Fills streamed past the disk (blobs over `cache.max_blob_size`) to
/// clients that do not read (five, on a pool of 4 threads) hold no thread
/// of the blocking pool either,
/// though the slowest reader paces them. Before, each such fill's writer
/// waited for its readers' queues on a thread of the pool, for up to the
/// idle timeout per chunk.
#[test]
fn fills_paced_by_slow_readers_leave_the_blocking_pool_to_hits() {
    small_blocking_pool().block_on(async {
        let up = FakeUpstream::start().await;
        let dir = tempfile::TempDir::new().unwrap();
        let toml = format!(
            "prefetch = false\n{}\n[cache]\nmax_blob_size = \"1MiB\"\n\
             [limits]\nidle_timeout = \"60s\"\n",
            // How long a fill waits for its slowest reader, per chunk.
            config_toml(dir.path(), &up.url(), "timeout = \"60s\"")
        );
        let st = start_stowage_toml(dir, &toml).await;
        let c = client();
        let stored = store_more_than_are_kept_open(&up, &st, &c).await;
        let mut unread = Vec::new();
        // Five distinct blobs of 24 MiB (more than a reader's queue and
        // its sockets hold), made from one: random bytes are slow to make
        // in a debug build.
        let base = random_bytes(24 * MIB);
        for i in 0..5u64 {
            let mut data = base.to_vec();
            data[..8].copy_from_slice(&i.to_le_bytes());
            let digest = up.add_blob(data);
            let r = within(5, "an uncached blob's response", async {
                c.get(st.blob_url("library/x", &digest))
                    .send()
                    .await
                    .unwrap()
            })
            .await;
            assert_eq!(r.status(), 200);
            unread.push(r);
        }
        // Long enough for every reader's queue and socket to fill up: the
        // fills then wait for their readers (they would be over by now if
        // the bodies fitted in the buffers).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            st.hooks.fills_in_flight(),
            5,
            "the fills wait for their readers"
        );
        stored_blobs_are_served(&st, &c, &stored, "fills wait for their readers").await;
        drop(unread);
    });
}
