//! Fault injection on the upstream side (issue 11, "Prove it"): an upstream
//! that resets mid-body, stalls after the head, stalls mid-body, sends more
//! or fewer bytes than its Content-Length, sends a wrong digest, answers 429
//! with Retry-After, answers 5xx in bursts, drips at 1 KiB/s; for blobs and
//! for manifests.
//!
//! For each: nothing hangs past the configured timeout (1 s here, plus 3 s
//! of slack for a debug build on a busy machine), no corrupt byte completes
//! a response (a response either fails or hashes to its digest), nothing bad
//! is cached (no blob or manifest file, no temporary file). Afterwards the
//! process's open file descriptors and tokio tasks are back to their
//! baseline within 16 (idle pooled upstream connections, a descriptor and a
//! task at each end, may stay up to 90 s) and its RSS within 48 MiB (the
//! allocator keeps some of what it freed).
//!
//! One test function: the leak checks measure the whole process, so no
//! other test may run beside it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_secs(3);

/// What a request came to.
#[derive(Debug)]
enum Got {
    /// The whole body, with the status.
    Body(u16, Vec<u8>),
    /// The transfer failed (after the head, or taking the head with it).
    Cut,
}

/// GETs `url`, reading the whole body; panics if it takes longer than
/// `bound`.
async fn fetch(url: &str, bound: Duration) -> (Got, reqwest::header::HeaderMap) {
    let started = Instant::now();
    let r = tokio::time::timeout(bound, async {
        // A body that fails before its first bytes went out takes the
        // response head with it (hyper writes the head with the first
        // body bytes): the request itself fails, which is a cut too.
        let Ok(r) = client().get(url).send().await else {
            return (Got::Cut, reqwest::header::HeaderMap::new());
        };
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        match r.bytes().await {
            Ok(b) => (Got::Body(status, b.to_vec()), headers),
            Err(_) => (Got::Cut, headers),
        }
    })
    .await;
    match r {
        Ok(got) => got,
        Err(_) => panic!("GET {url} hung past {bound:?} (started {started:?} ago)"),
    }
}

/// How a faulty exchange must end for the client.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Complete and correct (the fault only slowed it down).
    Ok,
    /// An error status, or a body cut short; never complete.
    Fails,
}

fn check(what: &str, got: &Got, want_digest: &str, expect: Expect) {
    match (got, expect) {
        (Got::Body(200, body), _) => {
            // A completed 200 must be the real thing, whatever the case.
            assert_eq!(
                sha256_digest(body),
                want_digest,
                "{what}: a corrupt body completed"
            );
            assert_eq!(expect, Expect::Ok, "{what}: completed, expected to fail");
        }
        (Got::Body(status, body), Expect::Fails) => {
            assert!(*status >= 400, "{what}: status {status}");
            check_oci_error_body(
                Some("application/json"),
                body,
                &["UNAVAILABLE", "TOOMANYREQUESTS"],
                what,
            );
        }
        (Got::Cut, Expect::Fails) => {}
        (got, Expect::Ok) => panic!("{what}: expected a complete body, got {got:?}"),
    }
}

/// Files of fills in `tmp/` (not the dot-files of small files being
/// replaced there, such as the journal's compaction after start-up).
fn tmp_files(cache: &Path) -> usize {
    std::fs::read_dir(stowage::test_hooks::tmp_dir(cache))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

async fn settle(st: &Stowage, up: &FakeUpstream) {
    within(20, "fills and upstream bodies end", async {
        while st.hooks.fills_in_flight() > 0 || up.bodies_open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_end_in_time_serve_nothing_corrupt_and_leak_nothing() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "timeout = \"1s\"").await;
    let cache = st.dir.path().to_path_buf();

    // Warm up (connections, token-less path, buffers), then the baseline.
    let warm = make_image(Format::Oci, &[64 * KIB]);
    up.push_image("library/warm", "1", &warm);
    pull_image(&client(), &st, "warm", "1", &warm).await;
    settle(&st, &up).await;
    let before = usage();

    let bound = TIMEOUT + SLACK;
    let body_faults = [
        ("reset mid-body", BodyFault::ResetMidBody),
        ("stall after the head", BodyFault::StallAfterHead),
        ("stall mid-body", BodyFault::StallMidBody),
        (
            "more bytes than Content-Length",
            BodyFault::LongerThanLength(100),
        ),
        (
            "fewer bytes than Content-Length",
            BodyFault::ShorterThanLength(100),
        ),
    ];
    let mut cases = 0;

    // Blobs: each fault, then a wrong digest.
    for (name, fault) in body_faults {
        let b = Blob::random(256 * KIB);
        up.add_blob(b.data.clone());
        up.fault(&b.digest, fault);
        let what = format!("blob, {name}");
        let (got, _) = fetch(&st.blob_url("library/f", &b.digest), bound).await;
        check(&what, &got, &b.digest, Expect::Fails);
        settle(&st, &up).await;
        assert!(
            !stowage::test_hooks::blob_path(&cache, &b.digest).exists(),
            "{what}: cached"
        );
        up.clear_fault(&b.digest);
        cases += 1;
    }
    let bad = Blob::random(256 * KIB);
    up.add_blob(bad.data.clone());
    up.corrupt(&bad.digest);
    let (got, _) = fetch(&st.blob_url("library/f", &bad.digest), bound).await;
    check("blob, wrong digest", &got, &bad.digest, Expect::Fails);
    settle(&st, &up).await;
    assert!(!stowage::test_hooks::blob_path(&cache, &bad.digest).exists());
    cases += 1;

    // A blob dripping at 1 KiB/s: slow, never idle for the timeout, so it
    // completes, verified and cached, in about its size in seconds.
    let drip = Blob::random(3 * KIB);
    up.add_blob(drip.data.clone());
    up.fault(&drip.digest, BodyFault::Drip(KIB as u64));
    let started = Instant::now();
    let (got, _) = fetch(
        &st.blob_url("library/f", &drip.digest),
        Duration::from_secs(3) + bound,
    )
    .await;
    check("blob dripping at 1 KiB/s", &got, &drip.digest, Expect::Ok);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the drip was not slow"
    );
    settle(&st, &up).await;
    assert!(stowage::test_hooks::blob_path(&cache, &drip.digest).exists());
    cases += 1;

    // 429 with Retry-After: passed on. 5xx in a burst: each request fails,
    // then upstream is back and the blob is cached.
    let limited = Blob::random(64 * KIB);
    up.add_blob(limited.data.clone());
    up.fail_next(&[429]);
    let (got, headers) = fetch(&st.blob_url("library/f", &limited.digest), bound).await;
    check("blob, 429", &got, &limited.digest, Expect::Fails);
    assert!(matches!(got, Got::Body(429, _)), "{got:?}");
    assert!(
        headers.contains_key("retry-after"),
        "Retry-After not passed on"
    );
    up.fail_next(&[503, 500, 502]);
    for i in 0..3 {
        let (got, _) = fetch(&st.blob_url("library/f", &limited.digest), bound).await;
        check(
            &format!("blob, 5xx burst #{i}"),
            &got,
            &limited.digest,
            Expect::Fails,
        );
    }
    let (got, _) = fetch(&st.blob_url("library/f", &limited.digest), bound).await;
    check("blob after the burst", &got, &limited.digest, Expect::Ok);
    settle(&st, &up).await;
    cases += 5;

    // Manifests by digest, uncached: the same body faults, a wrong digest,
    // a drip (a manifest must arrive whole within the timeout), 429, 5xx.
    let mut manifest_cases: Vec<(String, Image, Option<BodyFault>)> = body_faults
        .iter()
        .map(|(name, f)| {
            (
                format!("manifest, {name}"),
                make_image(Format::Oci, &[10]),
                Some(*f),
            )
        })
        .collect();
    manifest_cases.push((
        "manifest dripping at 1 KiB/s".into(),
        make_image(Format::Oci, &[10, 20, 30, 40, 50, 60]),
        Some(BodyFault::Drip(KIB as u64)),
    ));
    for (what, img, fault) in &manifest_cases {
        up.push_image_untagged("library/m", img);
        if let Some(f) = fault {
            up.fault(&img.digest, *f);
        }
        if matches!(fault, Some(BodyFault::Drip(_))) {
            assert!(
                img.manifest.len() > 1100,
                "the drip must outlast the timeout"
            );
        }
        let (got, _) = fetch(&st.manifest_url("m", &img.digest), bound).await;
        check(what, &got, &img.digest, Expect::Fails);
        assert!(
            !stowage::test_hooks::manifest_path(&cache, &img.digest).exists(),
            "{what}: cached"
        );
        up.clear_fault(&img.digest);
        // Not remembered: once upstream behaves, it is served and cached.
        let (got, _) = fetch(&st.manifest_url("m", &img.digest), bound).await;
        check(
            &format!("{what}, then behaving"),
            &got,
            &img.digest,
            Expect::Ok,
        );
        cases += 1;
    }
    let corrupt = make_image(Format::Oci, &[11]);
    up.push_image_untagged("library/m", &corrupt);
    up.corrupt(&corrupt.digest);
    let (got, _) = fetch(&st.manifest_url("m", &corrupt.digest), bound).await;
    check(
        "manifest, wrong digest",
        &got,
        &corrupt.digest,
        Expect::Fails,
    );
    assert!(!stowage::test_hooks::manifest_path(&cache, &corrupt.digest).exists());
    let limited = make_image(Format::Oci, &[12]);
    up.push_image_untagged("library/m", &limited);
    up.fail_next(&[429, 503, 500]);
    for i in 0..3 {
        let (got, headers) = fetch(&st.manifest_url("m", &limited.digest), bound).await;
        check(
            &format!("manifest, 429/5xx #{i}"),
            &got,
            &limited.digest,
            Expect::Fails,
        );
        if i == 0 {
            assert!(
                headers.contains_key("retry-after"),
                "Retry-After not passed on"
            );
        }
    }
    cases += 4;

    settle(&st, &up).await;
    assert_eq!(tmp_files(&cache), 0, "temporary files left behind");
    // Back to the baseline (see the margins in the module docs).
    let after = within(30, "usage back to the baseline", async {
        loop {
            let now = usage();
            if now.fds <= before.fds + 16 && now.tasks <= before.tasks + 16 {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    eprintln!("{cases} fault cases; before {before:?}; after {after:?}");
    assert!(
        after.rss <= before.rss + 48 * 1024 * 1024,
        "RSS grew from {} to {} bytes",
        before.rss,
        after.rss
    );
}
