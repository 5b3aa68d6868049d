//! A shared store that does not answer (an S3 endpoint where nothing
//! listens): the node serves from upstream as a single node would, says so
//! in its metrics and `/readyz` body, and stays ready. In a binary of its
//! own because it sets the S3 credential variables of the process.

mod common;

use std::time::Instant;

use common::*;
use tempfile::TempDir;

#[test]
fn a_dead_store_degrades_to_disk_and_upstream() {
    // SAFETY: set before any thread of this test binary exists (this is its
    // only test and the runtime is built below).
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "GKstowagetest");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "not-a-secret-not-a-secret");
        std::env::remove_var("AWS_ENDPOINT_URL");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let up = FakeUpstream::start().await;
    let a = Blob::random(100_000);
    let b = Blob::random(100_000);
    up.add_blob(a.data.clone());
    up.add_blob(b.data.clone());
    let dead = dead_url().await;
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "")
        + &format!(
            "\n[store]\nurl = \"s3://stowage/cache\"\nendpoint = \"{dead}\"\nregion = \"garage\"\ntimeout = \"2s\"\n"
        );
    let st = start_stowage_toml(dir, &toml).await;
    let c = client();
    check_blob(&c, &st, "test/app", &a).await;
    assert_eq!(up.blob_gets(&a.digest), 1);
    let labels = [("store", "s3://stowage/cache")];
    assert_eq!(metric(&st, "stowage_store_up", &labels).await, 0.0);
    assert_eq!(
        metric(&st, "stowage_store_requests_total", &[("result", "error")]).await,
        1.0
    );
    // While it is down it is not even asked: no delay.
    let started = Instant::now();
    check_blob(&c, &st, "test/app", &b).await;
    assert!(
        started.elapsed().as_millis() < 1500,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.blob_gets(&b.digest), 1);
    let r = c.get(st.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a store outage never makes a node unready");
    let body = r.text().await.unwrap();
    assert!(body.contains("store: s3://stowage/cache DOWN"), "{body}");
}
