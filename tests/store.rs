//! The shared store (`[store]`), on a `file://` bucket the in-process nodes
//! share (the real engine, Garage, is in tests/e2e/cluster.sh): uploads
//! after upstream fetches (one `PUT`, or multipart when large), a node with
//! an empty disk served from the bucket without upstream blob GETs, a
//! damaged object refused and forgotten, `/readyz` notes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const REPO: &str = "test/app";

/// stowage in front of `up` sharing the bucket directory `bucket`.
async fn start_with_bucket(up: &FakeUpstream, bucket: &Path) -> Stowage {
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "")
        + &format!("\n[store]\nurl = \"file://{}\"\n", bucket.display());
    start_stowage_toml(dir, &toml).await
}

fn object(bucket: &Path, kind: &str, digest: &str) -> std::path::PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    bucket.join(kind).join(alg).join(hex)
}

/// Waits (10 s at most) until the bucket holds `digest` with `len` bytes.
async fn wait_object(bucket: &Path, kind: &str, digest: &str) -> Vec<u8> {
    let path = object(bucket, kind, digest);
    for _ in 0..200 {
        if let Ok(data) = std::fs::read(&path) {
            return data;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{kind} {digest} never reached the bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_node_is_served_from_the_bucket_without_upstream_gets() {
    let up = FakeUpstream::start().await;
    // 12 MiB goes up in 5 MiB parts.
    let img = make_image(Format::Oci, &[3000, 12 << 20]);
    up.push_image(REPO, "v1", &img);
    let bucket = TempDir::new().unwrap();
    let c = client();

    let first = start_with_bucket(&up, bucket.path()).await;
    pull_image(&c, &first, REPO, "v1", &img).await;
    for b in img.blobs() {
        let data = wait_object(bucket.path(), "blobs", &b.digest).await;
        assert_eq!(sha256_digest(&data), b.digest, "uploaded bytes");
    }
    let m = wait_object(bucket.path(), "manifests", &img.digest).await;
    assert!(
        m.ends_with(&img.manifest),
        "manifest object: media type, then the bytes"
    );
    metric_becomes(
        &first,
        "stowage_store_uploads_total",
        &[("kind", "blob"), ("result", "ok")],
        3.0,
    )
    .await;
    let total: u64 = img.blobs().iter().map(|b| b.len() as u64).sum();
    // And the record of the tag (and accept class) it was fetched by: a
    // hint for empty nodes.
    let records: Vec<_> = std::fs::read_dir(bucket.path().join("tags/docker.io/test/app/_tags"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(records.len(), 1);
    let name = records[0].file_name().into_string().unwrap();
    assert!(name.starts_with("v1@"), "{name}");
    let record = std::fs::read_to_string(records[0].path()).unwrap();
    assert_eq!(record.trim(), img.digest);
    metric_becomes(
        &first,
        "stowage_store_upload_bytes_total",
        &[],
        (total + m.len() as u64 + record.len() as u64) as f64,
    )
    .await;
    first.stop().await;
    let gets_before = up.all_blob_gets();
    let manifest_gets = up.manifest_gets(REPO, "v1");

    // A new node, empty disk, same bucket.
    let second = start_with_bucket(&up, bucket.path()).await;
    pull_image(&c, &second, REPO, "v1", &img).await;
    assert_eq!(up.all_blob_gets(), gets_before, "no upstream blob GET");
    assert_eq!(
        up.manifest_gets(REPO, "v1"),
        manifest_gets,
        "the tag was resolved with HEAD, its manifest taken from the bucket"
    );
    assert_eq!(
        metric(
            &second,
            "stowage_store_requests_total",
            &[("result", "hit")]
        )
        .await,
        5.0,
        "three blobs, the tag record and the manifest"
    );
    assert_eq!(
        up.manifest_heads(REPO, "v1"),
        1,
        "the record confirmed with HEAD"
    );
    // Nothing to upload: it came from the bucket.
    assert_eq!(
        metric(&second, "stowage_store_uploads_total", &[]).await,
        0.0
    );
    let ready = client()
        .get(second.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ready.starts_with("ready\n"), "{ready}");
    assert!(ready.contains("store: file://"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_object_in_the_bucket_is_refused_then_fetched_upstream() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(200_000);
    up.add_blob(blob.data.clone());
    let bucket = TempDir::new().unwrap();
    let path = object(bucket.path(), "blobs", &blob.digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bad = blob.data.to_vec();
    bad[1000] ^= 1;
    std::fs::write(&path, &bad).unwrap();

    let st = start_with_bucket(&up, bucket.path()).await;
    let url = st.blob_url(REPO, &blob.digest);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the damaged bytes never complete");
    assert_eq!(up.blob_gets(&blob.digest), 0);
    assert_eq!(
        metric(&st, "stowage_digest_mismatches_total", &[("kind", "blob")]).await,
        1.0
    );
    // The damaged object is forgotten: the retry goes upstream, and the
    // right bytes replace it.
    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), blob.digest);
    assert_eq!(up.blob_gets(&blob.digest), 1);
    for _ in 0..200 {
        if std::fs::read(&path).is_ok_and(|d| sha256_digest(&d) == blob.digest) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the bucket kept the damaged object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_on_one_bucket_uploads_once_from_the_owner() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1 << 20);
    up.add_blob(blob.data.clone());
    let bucket = TempDir::new().unwrap();
    let urls = node_urls(3);
    let store = format!("[store]\nurl = \"file://{}\"\n", bucket.path().display());
    let nodes = start_cluster_nodes(&urls, &urls, &up.url(), "", |_| store.clone()).await;
    let c = client();
    for n in &nodes {
        check_blob(&c, n, REPO, &blob).await;
    }
    wait_object(bucket.path(), "blobs", &blob.digest).await;
    let owner = owner_of_digest(&urls, &blob.digest);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, n) in nodes.iter().enumerate() {
        let uploads = metric(n, "stowage_store_uploads_total", &[]).await;
        let reads = metric(n, "stowage_store_requests_total", &[]).await;
        if i == owner {
            assert_eq!(
                (uploads, reads),
                (1.0, 1.0),
                "the owner looked, fetched, uploaded"
            );
        } else {
            assert_eq!(
                (uploads, reads),
                (0.0, 0.0),
                "node {i} asked the owner only"
            );
        }
    }
    assert_eq!(up.blob_gets(&blob.digest), 1);
}
