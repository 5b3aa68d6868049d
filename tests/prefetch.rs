//! Prefetch: a manifest GET starts fills for the image's config and layers
//! before the client asks for them; bounded by `prefetch.max_concurrent`
//! and by room under the cache's high watermark; off with
//! `prefetch = false`; an index prefetches its configured platforms; the
//! metrics count what was prefetched and what nobody asked for.

mod common;

use std::time::Duration;

use common::*;

/// A config with one upstream (`docker.io` at `upstream`) and `top` lines
/// (`[prefetch]`, `[cache]` tables) before it.
fn toml_with(dir: &tempfile::TempDir, upstream: &str, top: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ncache_dir = {dir:?}\nshutdown_timeout = \"2s\"\n\
         {top}\n[[upstream]]\nhost = \"docker.io\"\nurl = \"{upstream}\"\nlibrary_prefix = true\n",
        dir = dir.path().to_str().unwrap(),
    )
}

async fn start(up: &FakeUpstream, top: &str) -> Stowage {
    let dir = tempfile::TempDir::new().unwrap();
    let toml = toml_with(&dir, &up.url(), top);
    start_stowage_toml(dir, &toml).await
}

/// Waits until `cond` holds, checking every 10 ms; fails after 10 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of an unlabelled series at `/metrics`.
async fn metric(st: &Stowage, name: &str) -> u64 {
    let text = client()
        .get(st.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}")) as u64
}

/// Prefetches are fills nobody reads, bounded by `prefetch.max_concurrent`:
/// `cache.max_detached_fills`, the bound of fills whose clients left, does
/// not stop them, even at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_go_on_when_no_detached_fill_is_allowed() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[300_000, 400_000, 500_000]);
    up.push_image("library/app", "1", &img);
    let st = start(&up, "[cache]\nmax_detached_fills = 0\n").await;
    let total: u64 = img.blobs().iter().map(|b| b.len() as u64).sum();
    get_manifest(&st, "library/app", "1").await;
    until("prefetch fills of the config and 3 layers", || {
        img.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1) && st.hooks.fills_in_flight() == 0
    })
    .await;
    assert_eq!(st.hooks.used(), total, "every prefetched blob stored");
    for b in img.blobs() {
        assert_eq!(get_blob(&st, "library/app", b).await, "hit");
    }
}

async fn get_manifest(st: &Stowage, name: &str, reference: &str) {
    let (_, _) = get_ok(&client(), &st.manifest_url(name, reference)).await;
}

/// GETs a blob, checking its bytes; returns `X-Stowage-Cache`.
async fn get_blob(st: &Stowage, name: &str, b: &Blob) -> String {
    let (h, body) = get_ok(&client(), &st.blob_url(name, &b.digest)).await;
    assert!(body == b.data, "bytes of {}", b.digest);
    h.get("x-stowage-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_get_fills_config_and_layers_before_the_client_asks() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[100_000, 200_000, 300_000]);
    up.push_image("library/app", "1", &img);
    let st = start(&up, "").await;
    let total: u64 = img.blobs().iter().map(|b| b.len() as u64).sum();

    get_manifest(&st, "library/app", "1").await;
    // No blob asked for by the client, yet every one is fetched and stored.
    until("prefetch fills of the config and 3 layers", || {
        img.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1) && st.hooks.fills_in_flight() == 0
    })
    .await;
    assert_eq!(st.hooks.used(), total, "prefetched bytes stored");
    assert_eq!(metric(&st, "stowage_prefetch_blobs_total").await, 4);
    assert_eq!(metric(&st, "stowage_prefetch_bytes_total").await, total);
    assert_eq!(metric(&st, "stowage_prefetch_unread_bytes").await, total);

    // The client's requests are hits; upstream is not asked again.
    let first = img.blobs()[0].clone();
    assert_eq!(get_blob(&st, "library/app", &first).await, "hit");
    assert_eq!(
        metric(&st, "stowage_prefetch_unread_bytes").await,
        total - first.len() as u64,
        "a blob asked for is no longer unread"
    );
    for b in img.blobs() {
        assert_eq!(get_blob(&st, "library/app", b).await, "hit");
        assert_eq!(up.blob_gets(&b.digest), 1, "upstream GETs of {}", b.digest);
    }
    assert_eq!(metric(&st, "stowage_prefetch_unread_bytes").await, 0);
    assert_eq!(
        metric(&st, "stowage_prefetch_evicted_unread_bytes_total").await,
        0
    );

    // The manifest again: nothing more is prefetched.
    get_manifest(&st, "library/app", "1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.all_blob_gets(), 4);
    assert_eq!(metric(&st, "stowage_prefetch_blobs_total").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_joins_a_running_prefetch_fill() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Docker, &[2 << 20]);
    up.push_image("library/app", "1", &img);
    let layer = img.layers[0].clone();
    let hold = up.hold(&layer.digest);
    let st = start(&up, "").await;

    get_manifest(&st, "library/app", "1").await;
    // The prefetch fill is streaming (half the layer sent) before the
    // client asks for the layer.
    within(10, "prefetch fill streaming", hold.wait_half_sent(1)).await;
    let url = st.blob_url("library/app", &layer.digest);
    let r = within(10, "blob GET", client().get(&url).send())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-stowage-cache").as_deref(), Some("join"));
    hold.release();
    let body = within(30, "blob body", r.bytes()).await.unwrap();
    assert!(body == layer.data, "bytes of the joined prefetch fill");
    assert_eq!(up.blob_gets(&layer.digest), 1, "one upstream GET");
    until("fill committed", || st.hooks.fills_in_flight() == 0).await;
    // Asked for while filling: not unread.
    let unread = metric(&st, "stowage_prefetch_unread_bytes").await;
    assert_eq!(unread, img.config.len() as u64, "only the config is unread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_off_and_head_start_no_fill() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000, 2000]);
    up.push_image("library/app", "1", &img);

    let off = start(&up, "prefetch = false").await;
    get_manifest(&off, "library/app", "1").await;
    let on = start(&up, "").await;
    let r = client()
        .head(on.manifest_url("library/app", "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.all_blob_gets(), 0, "no blob fetched");
    assert_eq!(metric(&off, "stowage_prefetch_blobs_total").await, 0);
    assert_eq!(metric(&on, "stowage_prefetch_blobs_total").await, 0);
    // The client still gets its blobs, one upstream GET each.
    for b in img.blobs() {
        assert_eq!(get_blob(&off, "library/app", b).await, "miss");
        assert_eq!(up.blob_gets(&b.digest), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_max_concurrent_prefetch_fills() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[64 << 10; 6]);
    up.push_image("library/app", "1", &img);
    let holds: Vec<Hold> = img.blobs().iter().map(|b| up.hold(&b.digest)).collect();
    let st = start(&up, "[prefetch]\nmax_concurrent = 2").await;

    get_manifest(&st, "library/app", "1").await;
    until("2 prefetch fills", || up.all_blob_gets() == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.all_blob_gets(), 2, "no more than max_concurrent at once");
    assert_eq!(st.hooks.fills_in_flight(), 2);
    // Config first, then the layers in order.
    assert_eq!(up.blob_gets(&img.config.digest), 1);
    assert_eq!(up.blob_gets(&img.layers[0].digest), 1);
    for h in &holds {
        h.release();
    }
    until("all 7 blobs prefetched", || {
        img.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1) && st.hooks.fills_in_flight() == 0
    })
    .await;
    for b in img.blobs() {
        assert_eq!(get_blob(&st, "library/app", b).await, "hit");
    }
    assert_eq!(up.all_blob_gets(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetch_never_makes_room_by_evicting() {
    let up = FakeUpstream::start().await;
    // Budget 1 MiB, high watermark 0.95: the config and two 400 kB layers
    // fit, the third would pass the watermark.
    let img = make_image(Format::Oci, &[400_000, 400_000, 400_000]);
    up.push_image("library/app", "1", &img);
    let st = start(&up, "[cache]\nmax_size = \"1MiB\"").await;

    get_manifest(&st, "library/app", "1").await;
    until("two layers prefetched", || {
        up.blob_gets(&img.layers[1].digest) == 1 && st.hooks.fills_in_flight() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.blob_gets(&img.config.digest), 1);
    assert_eq!(up.blob_gets(&img.layers[0].digest), 1);
    assert_eq!(up.blob_gets(&img.layers[2].digest), 0, "over the watermark");
    assert_eq!(
        st.hooks.evicted_blobs(),
        0,
        "nothing evicted for a prefetch"
    );
    assert!(st.hooks.used() <= 1 << 20);
    // The client asking for the last layer gets it (and may evict).
    assert_eq!(get_blob(&st, "library/app", &img.layers[2]).await, "miss");
}

/// A manifest that under-states its layers' sizes (1 byte each for 400 kB)
/// cannot make a prefetch evict: what upstream announces past the
/// manifest's size needs room under the watermark too, else the prefetch
/// gives up before streaming. A client asking for such a layer gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_under_stating_sizes_cannot_make_a_prefetch_evict() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[400_000, 400_000, 400_000]);
    up.push_image("library/app", "honest", &img);
    let mut m: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    for l in m["layers"].as_array_mut().unwrap() {
        l["size"] = 1.into();
    }
    up.add_manifest(
        "library/app",
        Some("1"),
        img.media_type.as_str(),
        serde_json::to_vec(&m).unwrap(),
    );
    let st = start(&up, "[cache]\nmax_size = \"1MiB\"").await;

    get_manifest(&st, "library/app", "1").await;
    until("the layers asked upstream", || {
        img.layers.iter().all(|l| up.blob_gets(&l.digest) == 1) && st.hooks.fills_in_flight() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        st.hooks.evicted_blobs(),
        0,
        "nothing evicted for a prefetch"
    );
    assert!(st.hooks.used() <= 1 << 20, "used {}", st.hooks.used());
    // Two layers fit; the one that did not is fetched for a client.
    let missing: Vec<_> = img
        .layers
        .iter()
        .filter(|l| !stowage::test_hooks::blob_path(st.dir.path(), &l.digest).exists())
        .collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(get_blob(&st, "library/app", missing[0]).await, "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_prefetches_configured_platforms_and_the_platform_manifest_its_own() {
    let up = FakeUpstream::start().await;
    let amd = make_image_for(Format::Oci, &[10_000, 20_000], "amd64");
    let arm = make_image_for(Format::Oci, &[30_000], "arm64");
    let index = make_index(
        Format::Oci,
        vec![(amd.clone(), "amd64"), (arm.clone(), "arm64")],
    );
    up.push_index("library/multi", "1", &index);

    // With platforms: the index alone prefetches arm64's manifest and blobs.
    let st = start(&up, "[prefetch]\nplatforms = [\"linux/arm64\"]").await;
    get_manifest(&st, "library/multi", "1").await;
    until("arm64 blobs prefetched", || {
        arm.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.manifest_gets("library/multi", &arm.digest), 1);
    assert_eq!(up.manifest_gets("library/multi", &amd.digest), 0);
    for b in amd.blobs() {
        assert_eq!(up.blob_gets(&b.digest), 0, "amd64 is not configured");
    }
    // The client's own request for the arm64 manifest is a hit.
    let (h, body) = get_ok(&client(), &st.manifest_url("library/multi", &arm.digest)).await;
    assert_eq!(body, arm.manifest);
    assert_eq!(h.get("x-stowage-cache").unwrap(), "hit");

    // Without platforms: the index prefetches nothing; the platform
    // manifest the client then asks for prefetches its blobs.
    let st2 = start(&up, "").await;
    get_manifest(&st2, "library/multi", "1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for b in amd.blobs() {
        assert_eq!(up.blob_gets(&b.digest), 0);
    }
    get_manifest(&st2, "library/multi", &amd.digest).await;
    until("amd64 blobs prefetched", || {
        amd.blobs().iter().all(|b| up.blob_gets(&b.digest) == 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefetched_bytes_evicted_unread_are_counted() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[300_000, 300_000]);
    up.push_image("library/app", "1", &img);
    let big = Blob::random(700_000);
    up.add_blob(big.data.clone());
    let st = start(&up, "[cache]\nmax_size = \"1MiB\"").await;
    let total: u64 = img.blobs().iter().map(|b| b.len() as u64).sum();

    get_manifest(&st, "library/app", "1").await;
    until("prefetched", || {
        up.all_blob_gets() == 3 && st.hooks.fills_in_flight() == 0
    })
    .await;
    assert_eq!(metric(&st, "stowage_prefetch_unread_bytes").await, total);
    // A client's blob needs the room: the unread prefetched blobs go.
    assert_eq!(get_blob(&st, "library/big", &big).await, "miss");
    until("evicted", || st.hooks.evicted_blobs() >= 2).await;
    let unread = metric(&st, "stowage_prefetch_unread_bytes").await;
    let wasted = metric(&st, "stowage_prefetch_evicted_unread_bytes_total").await;
    assert!(wasted >= 600_000, "evicted unread bytes: {wasted}");
    assert_eq!(
        unread + wasted,
        total,
        "every prefetched byte is accounted for"
    );
}

/// Nested indexes are followed at most two levels below the manifest
/// asked for: a chain of indexes published upstream (each one `GET`, up
/// to 4 MiB held) does not drive the prefetch without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chain_of_nested_indexes_is_prefetched_only_two_levels_deep() {
    let up = FakeUpstream::start().await;
    let img = make_image_for(Format::Oci, &[10_000], "amd64");
    up.push_image_untagged("library/nest", &img);
    // chain[0] lists the image; chain[k] lists chain[k - 1]; the tag
    // points at the last.
    let mut chain: Vec<String> = Vec::new();
    let (mut below, mut below_type, mut below_size) =
        (img.digest.clone(), OCI_MANIFEST, img.manifest.len());
    for k in 0..10 {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{below_type}","digest":"{below}","size":{below_size},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let tag = (k == 9).then_some("1");
        let digest = up.add_manifest("library/nest", tag, OCI_INDEX, body.clone());
        (below, below_type, below_size) = (digest.clone(), OCI_INDEX, body.len());
        chain.push(digest);
    }
    let st = start(&up, "[prefetch]\nplatforms = [\"linux/amd64\"]").await;
    get_manifest(&st, "library/nest", "1").await;
    until("two nested levels prefetched", || {
        up.manifest_gets("library/nest", &chain[7]) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.manifest_gets("library/nest", &chain[8]), 1);
    let deeper: usize = chain[..7]
        .iter()
        .map(|d| up.manifest_gets("library/nest", d))
        .sum::<usize>()
        + up.manifest_gets("library/nest", &img.digest);
    assert_eq!(deeper, 0, "manifests fetched deeper than two levels");
}
