//! The bounded blob cache: byte budget with LRU eviction, restarts, crashes
//! (kill -9 of the real binary), disk failures, oversize blobs and pinning.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

/// Where stowage keeps a verified blob.
fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    stowage::test_hooks::blob_path(cache, digest)
}

/// Total bytes of files in the blob store.
fn store_bytes(cache: &Path) -> u64 {
    fn walk(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                let m = e.metadata().unwrap();
                if m.is_dir() { walk(&e.path()) } else { m.len() }
            })
            .sum()
    }
    walk(&stowage::test_hooks::blobs_dir(cache))
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

/// GETs a blob through stowage, checks the bytes, and waits until the fill
/// (if any) has been committed: clients finish at verification, before the
/// fsyncs and the rename.
async fn fetch(st: &Stowage, b: &Blob) {
    let r = client()
        .get(st.blob_url("library/x", &b.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(
        sha256_digest(&body),
        b.digest,
        "served bytes hash to the digest"
    );
    let hooks = st.hooks.clone();
    wait_until("fill committed", || hooks.fills_in_flight() == 0).await;
}

fn cache_toml(dir: &Path, upstream: &str, cache: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"off\"\ncache_dir = {dir:?}\nshutdown_timeout = \"2s\"\n\
         [cache]\n{cache}\n\
         [[upstream]]\nhost = \"docker.io\"\nurl = \"{upstream}\"\nlibrary_prefix = true\n",
        dir = dir.to_str().unwrap()
    )
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(10, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// xorshift: a reproducible workload without a rand dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_and_keeps_most_recently_used() {
    let up = FakeUpstream::start().await;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let blobs: Vec<Blob> = (0..24)
        .map(|_| Blob::random(64 * KIB + rng.below(320 * KIB as u64) as usize))
        .collect();
    for b in &blobs {
        up.add_blob(b.data.clone());
    }
    let max = 2 * MIB as u64;
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(
        dir.path(),
        &up.url(),
        "max_size = \"2MiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.6",
    );
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();

    let mut last_use: HashMap<usize, usize> = HashMap::new();
    let mut upstream_gets = 0;
    for step in 0..150 {
        let i = rng.below(blobs.len() as u64) as usize;
        let cached_before = blob_file(&cache, &blobs[i].digest).exists();
        fetch(&st, &blobs[i]).await;
        last_use.insert(i, step);
        if !cached_before {
            upstream_gets += 1;
        }
        let used = store_bytes(&cache);
        assert!(
            used <= max,
            "step {step}: store holds {used} bytes, budget {max}"
        );
        assert_eq!(
            tmp_files(&cache),
            0,
            "step {step}: no temporary files after the fill"
        );
        // Every cached blob was used more recently than every evicted one.
        let (mut cached, mut evicted) = (Vec::new(), Vec::new());
        for (&b, &t) in &last_use {
            if blob_file(&cache, &blobs[b].digest).exists() {
                cached.push(t);
            } else {
                evicted.push(t);
            }
        }
        if let (Some(oldest_cached), Some(newest_evicted)) =
            (cached.iter().min(), evicted.iter().max())
        {
            assert!(
                oldest_cached > newest_evicted,
                "step {step}: a blob used at step {newest_evicted} was evicted while one \
                 last used at step {oldest_cached} was kept"
            );
        }
    }
    assert_eq!(
        up.all_blob_gets(),
        upstream_gets,
        "a hit never goes upstream"
    );
    let index = &st.hooks;
    assert!(
        index.evicted_blobs() > 0,
        "the workload exceeded the budget, so it evicted"
    );
    assert_eq!(
        index.used(),
        store_bytes(&cache),
        "index usage matches the disk"
    );
    assert_eq!(index.reserved(), 0, "no reservation left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_from_cache_and_keeps_recency() {
    let up = FakeUpstream::start().await;
    let (a, b, c) = (
        Blob::random(300 * KIB),
        Blob::random(300 * KIB),
        Blob::random(300 * KIB),
    );
    for x in [&a, &b, &c] {
        up.add_blob(x.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let roomy = cache_toml(dir.path(), &up.url(), "max_size = \"10MiB\"");
    let st = start_stowage_toml(dir, &roomy).await;
    // Inserted A, B, C; then A used again: LRU order B < C < A (FIFO: A < B < C).
    for x in [&a, &b, &c, &a] {
        fetch(&st, x).await;
    }
    assert_eq!(up.all_blob_gets(), 3);
    let dir = st.stop().await;

    // Same budget: everything is served from the cache, in LRU order B, C, A.
    let st = start_stowage_toml(dir, &roomy).await;
    for x in [&b, &c, &a] {
        fetch(&st, x).await;
    }
    assert_eq!(
        up.all_blob_gets(),
        3,
        "no upstream blob request after a restart"
    );
    let dir = st.stop().await;

    // Restart with room for two: the least recently used (B) goes, not the
    // first inserted (A).
    let path = dir.path().to_path_buf();
    let tight = cache_toml(
        &path,
        &up.url(),
        "max_size = \"700KiB\"\nhigh_watermark = 1.0\nlow_watermark = 0.9",
    );
    let st = start_stowage_toml(dir, &tight).await;
    let index = st.hooks.clone();
    wait_until("index loaded", || index.index_loaded()).await;
    wait_until("B evicted", || !blob_file(&path, &b.digest).exists()).await;
    assert!(
        blob_file(&path, &a.digest).exists(),
        "A was used last and stays"
    );
    assert!(blob_file(&path, &c.digest).exists(), "C stays");
    for x in [&a, &c] {
        fetch(&st, x).await;
    }
    assert_eq!(up.all_blob_gets(), 3, "A and C still cached");
    fetch(&st, &b).await;
    assert_eq!(
        up.blob_gets(&b.digest),
        2,
        "B was evicted and fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_write_failure_still_serves_every_client() {
    let up = FakeUpstream::start().await;
    let b = Blob::random(6 * MIB);
    up.add_blob(b.data.clone());
    let st = start_stowage(&up.url(), "").await;
    st.hooks.inject_write_failure(Some(MIB as u64));

    let url = st.blob_url("library/x", &b.digest);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (url, b) = (url.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "client {i}");
            let body = r
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(
                sha256_digest(&body),
                b.digest,
                "client {i} got the whole blob"
            );
        }));
    }
    for t in tasks {
        within(30, "clients during a disk failure", t)
            .await
            .unwrap();
    }
    let cache = st.dir.path();
    assert!(!blob_file(cache, &b.digest).exists(), "nothing cached");
    wait_until("temporary file removed", || tmp_files(cache) == 0).await;
    assert_eq!(st.hooks.reserved(), 0);

    // The disk recovers: the next request fetches again and caches.
    st.hooks.inject_write_failure(None);
    let before = up.blob_gets(&b.digest);
    fetch(&st, &b).await;
    assert_eq!(up.blob_gets(&b.digest), before + 1);
    assert!(
        blob_file(cache, &b.digest).exists(),
        "cached once the disk works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_larger_than_budget_is_streamed_not_cached() {
    let up = FakeUpstream::start().await;
    let big = Blob::random(3 * MIB);
    up.add_blob(big.data.clone());
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"1MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    fetch(&st, &big).await;
    assert!(!blob_file(st.dir.path(), &big.digest).exists());
    assert_eq!(store_bytes(st.dir.path()), 0);
    assert_eq!(
        tmp_files(st.dir.path()),
        0,
        "an oversize blob never touches the disk"
    );
    fetch(&st, &big).await;
    assert_eq!(up.blob_gets(&big.digest), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_survive_eviction() {
    let (up, img, others, st, _) = pinned_image_cached().await;
    pinned_blobs_outlast(&st, &up, &img, &others).await;
}

/// An upstream with `library/pinned:1` (two 200 KiB layers) and twelve
/// other 200 KiB blobs, and a 1 MiB cache that pins the image, its pin
/// resolved and its blobs fetched; with the cache's config.
async fn pinned_image_cached() -> (FakeUpstream, Image, Vec<Blob>, Stowage, String) {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[200 * KIB, 200 * KIB]);
    up.push_image("library/pinned", "1", &img);
    let others: Vec<Blob> = (0..12).map(|_| Blob::random(200 * KIB)).collect();
    for b in &others {
        up.add_blob(b.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(
        dir.path(),
        &up.url(),
        "max_size = \"1MiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.5\npin = [\"docker.io/library/pinned:1\"]",
    );
    let st = start_stowage_toml(dir, &toml).await;
    let index = st.hooks.clone();
    let layer = img.layers[0].digest.clone();
    wait_until("pins resolved", || index.is_pinned(&layer)).await;
    for b in img.blobs() {
        fetch(&st, b).await;
    }
    (up, img, others, st, toml)
}

/// Fetches `others`, far more than the budget and all more recent than
/// the pinned `img`: the pinned blobs stay, never fetched again.
async fn pinned_blobs_outlast(st: &Stowage, up: &FakeUpstream, img: &Image, others: &[Blob]) {
    for b in others {
        fetch(st, b).await;
    }
    assert!(st.hooks.evicted_blobs() > 0);
    for b in img.blobs() {
        assert!(
            blob_file(st.dir.path(), &b.digest).exists(),
            "pinned blob kept"
        );
        fetch(st, b).await;
        assert_eq!(up.blob_gets(&b.digest), 1, "pinned blob never refetched");
    }
    assert!(store_bytes(st.dir.path()) <= MIB as u64);
}

/// Descriptors of this process open on `path` after it was unlinked.
fn open_deleted(path: &Path) -> usize {
    let deleted = format!("{} (deleted)", path.display());
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == deleted.as_str())
        })
        .count()
}

/// A stored blob kept open for fast hits is let go when it is evicted, so
/// its disk space is freed then and the store stays within its budget on
/// disk too, not only in the index (it was held until four other blobs had
/// been opened, however long that took).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_blob_kept_open_for_hits_is_let_go() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Blob> = (0..3).map(|_| Blob::random(800 * KIB)).collect();
    for b in &blobs {
        up.add_blob(b.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(
        dir.path(),
        &up.url(),
        "max_size = \"2MiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.6",
    );
    let st = start_stowage_toml(dir, &toml).await;
    let first = blob_file(st.dir.path(), &blobs[0].digest);
    // A miss, then a hit: the hit keeps the file open.
    fetch(&st, &blobs[0]).await;
    fetch(&st, &blobs[0]).await;
    assert_eq!(
        up.blob_gets(&blobs[0].digest),
        1,
        "the second GET was a hit"
    );
    // Two misses past the high watermark evict the least recently used.
    fetch(&st, &blobs[1]).await;
    fetch(&st, &blobs[2]).await;
    let hooks = st.hooks.clone();
    wait_until("the first blob evicted", || {
        hooks.evicted_blobs() > 0 && !first.exists()
    })
    .await;
    wait_until("the evicted blob's descriptor closed", || {
        open_deleted(&first) == 0
    })
    .await;
    assert!(store_bytes(st.dir.path()) <= 2 * MIB as u64);
}

/// Picks a free loopback port (tiny race with other processes; fine here).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary (so that kill -9 is a real crash) on `config`, once it
/// answers `/v2/` on `port`; with its base URL.
async fn start_binary(config: &Path, port: u16) -> (Process, String) {
    let child = Process::with_config(config, &[]);
    let url = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{url}/v2/")).await;
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fill_leaves_only_verified_blobs() {
    let up = FakeUpstream::start().await;
    let done = Blob::random(512 * KIB);
    let interrupted = Blob::random(4 * MIB);
    up.add_blob(done.data.clone());
    up.add_blob(interrupted.data.clone());
    let dir = TempDir::new().unwrap();
    let port = free_port();
    let config = dir.path().join("stowage.toml");
    let cache = dir.path().join("cache");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"off\"\ncache_dir = {cache:?}\n\
             [[upstream]]\nhost = \"docker.io\"\nurl = \"{}\"\nlibrary_prefix = true\n",
            up.url()
        ),
    )
    .unwrap();
    let (mut child, url) = start_binary(&config, port).await;
    let c = client();
    let get = |d: &str| c.get(format!("{url}/v2/library/x/blobs/{d}")).send();
    let body = get(&done.digest).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), done.digest);

    wait_until("first blob committed", || {
        blob_file(&cache, &done.digest).exists()
    })
    .await;
    let hold = up.hold(&interrupted.digest);
    let resp = get(&interrupted.digest).await.unwrap();
    assert_eq!(resp.status(), 200);
    hold.wait_half_sent(1).await;
    wait_until("partial fill on disk", || tmp_files(&cache) == 1).await;
    child.kill9();
    drop(resp);
    up.unhold(&interrupted.digest);
    assert!(
        !blob_file(&cache, &interrupted.digest).exists(),
        "a partial blob is never in the store"
    );

    let (_child, url) = start_binary(&config, port).await;
    assert_eq!(
        tmp_files(&cache),
        0,
        "leftovers of the interrupted fill are removed at start"
    );
    let get = |d: &str| c.get(format!("{url}/v2/library/x/blobs/{d}")).send();
    let body = get(&done.digest).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), done.digest);
    assert_eq!(
        up.blob_gets(&done.digest),
        1,
        "the committed blob survived the crash"
    );
    let body = get(&interrupted.digest)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_digest(&body), interrupted.digest);
    assert_eq!(
        up.blob_gets(&interrupted.digest),
        2,
        "the interrupted blob is fetched again"
    );
}

/// Every file under `blobs/` of `cache`, as (digest named by its path,
/// digest of its bytes).
fn stored_files(cache: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let root = cache.join("blobs").join("sha256");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return out;
    };
    for d in dirs.flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            let name = format!("sha256:{}", f.file_name().to_string_lossy());
            out.push((name, sha256_digest(&std::fs::read(f.path()).unwrap())));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_group_commits_leaves_only_verified_blobs() {
    let up = FakeUpstream::start().await;
    // 24 blobs verified at about the same time (one image, prefetched):
    // their commits run in groups.
    let img = make_image(Format::Oci, &[256 * KIB; 24]);
    up.push_image("library/many", "1", &img);
    let dir = TempDir::new().unwrap();
    let port = free_port();
    let config = dir.path().join("stowage.toml");
    let cache = dir.path().join("cache");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"off\"\ncache_dir = {cache:?}\n\
             [[upstream]]\nhost = \"docker.io\"\nurl = \"{}\"\nlibrary_prefix = true\n",
            up.url()
        ),
    )
    .unwrap();
    let (mut child, url) = start_binary(&config, port).await;
    let c = client();
    let r = c
        .get(format!("{url}/v2/library/many/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Killed while the fills are landing and committing.
    wait_until("some blobs committed", || !stored_files(&cache).is_empty()).await;
    child.kill9();
    let stored = stored_files(&cache);
    eprintln!(
        "{} of 25 blobs committed at the kill, {} temporary files",
        stored.len(),
        tmp_files(&cache)
    );
    for (name, actual) in &stored {
        assert_eq!(name, actual, "a file in blobs/ is complete and verified");
    }

    // After the restart every blob is served whole; those committed before
    // the crash are not fetched again.
    let (_child, url) = start_binary(&config, port).await;
    assert_eq!(tmp_files(&cache), 0, "leftovers removed at start");
    for b in img.blobs() {
        let before = up.blob_gets(&b.digest);
        let body = c
            .get(format!("{url}/v2/library/many/blobs/{}", b.digest))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(sha256_digest(&body), b.digest);
        if stored.iter().any(|(n, _)| *n == b.digest) {
            assert_eq!(up.blob_gets(&b.digest), before, "committed blob refetched");
        }
    }
    for (name, actual) in stored_files(&cache) {
        assert_eq!(name, actual);
    }
}

/// A fill counts against the budget as its bytes land, not for what it
/// announced: a fill that has received nothing evicts nothing (issue 11:
/// "a reservation does not evict the whole cache before a byte arrives"),
/// and a fill without Content-Length is counted as it grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_count_against_the_budget_as_bytes_land() {
    let up = FakeUpstream::start().await;
    let small: Vec<Blob> = (0..8).map(|_| Blob::random(MIB)).collect();
    for b in &small {
        up.add_blob(b.data.clone());
    }
    let big = Blob::random(6 * MIB);
    up.add_blob(big.data.clone());
    up.fault(&big.digest, BodyFault::StallAfterHead);
    let dir = TempDir::new().unwrap();
    let mut toml = cache_toml(dir.path(), &up.url(), "max_size = \"10MiB\"");
    toml.push_str("timeout = \"2s\"\n");
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();
    for b in &small {
        fetch(&st, b).await;
    }
    assert_eq!(st.hooks.used(), 8 * MIB as u64);

    // 6 MiB announced, nothing sent: nothing is evicted, before or after
    // the fill gives up.
    let url = st.blob_url("library/x", &big.digest);
    let stalled = tokio::spawn(async move {
        let r = client().get(&url).send().await.unwrap();
        r.bytes().await
    });
    wait_until("the big fill reached upstream", || {
        up.blob_gets(&big.digest) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        st.hooks.evicted_blobs(),
        0,
        "evicted for bytes that never came"
    );
    assert_eq!(st.hooks.reserved(), 0);
    assert!(
        within(10, "the stalled fill", stalled)
            .await
            .unwrap()
            .is_err()
    );
    let hooks = st.hooks.clone();
    wait_until("the stalled fill ended", || hooks.fills_in_flight() == 0).await;
    assert_eq!(st.hooks.evicted_blobs(), 0);
    assert!(small.iter().all(|b| blob_file(&cache, &b.digest).exists()));

    // Without Content-Length: counted as it grows (held after half).
    up.set_chunked(true);
    let unsized_blob = Blob::random(2 * MIB);
    up.add_blob(unsized_blob.data.clone());
    let hold = up.hold(&unsized_blob.digest);
    let url = st.blob_url("library/x", &unsized_blob.digest);
    let reader =
        tokio::spawn(async move { client().get(&url).send().await.unwrap().bytes().await });
    hold.wait_half_sent(1).await;
    let hooks = st.hooks.clone();
    wait_until("the unsized fill is counted", || {
        hooks.reserved() >= MIB as u64
    })
    .await;
    hold.release();
    let body = within(10, "the unsized blob", reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sha256_digest(&body), unsized_blob.digest);
    let hooks = st.hooks.clone();
    wait_until("committed", || hooks.fills_in_flight() == 0).await;
    assert_eq!(st.hooks.reserved(), 0);
    assert!(store_bytes(&cache) <= 10 * MIB as u64);
    assert_eq!(st.hooks.used(), store_bytes(&cache));
}

/// `cache.max_blob_size` bounds fills: a blob announced larger streams
/// without caching; one without Content-Length that grows past it is cut
/// (never cached, nothing left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_blob_size_bounds_fills() {
    let up = FakeUpstream::start().await;
    let big = Blob::random(3 * MIB);
    up.add_blob(big.data.clone());
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(
        dir.path(),
        &up.url(),
        "max_size = \"10MiB\"\nmax_blob_size = \"2MiB\"",
    );
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();
    fetch(&st, &big).await;
    assert!(
        !blob_file(&cache, &big.digest).exists(),
        "over max_blob_size, cached"
    );
    assert_eq!(
        tmp_files(&cache),
        0,
        "an oversize blob never touches the disk"
    );

    up.set_chunked(true);
    let r = client()
        .get(st.blob_url("library/x", &big.digest))
        .send()
        .await
        .unwrap();
    assert!(
        r.bytes().await.is_err(),
        "an unsized blob over max_blob_size completed"
    );
    let hooks = st.hooks.clone();
    wait_until("the cut fill ended", || hooks.fills_in_flight() == 0).await;
    assert!(!blob_file(&cache, &big.digest).exists());
    wait_until("temporary file removed", || tmp_files(&cache) == 0).await;
    assert_eq!(st.hooks.reserved(), 0);
}

/// Sends `GET path` on a socket with a tiny receive buffer and never reads
/// the answer: a client that is stuck.
async fn stuck_client(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

/// With the disk failing, readers get the bytes past it through per-reader
/// queues: a reader that stops reading is cut after the idle timeout
/// instead of stalling the fill for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_cuts_a_stuck_reader_instead_of_stalling_the_fill() {
    use tokio::io::AsyncReadExt as _;
    let up = FakeUpstream::start().await;
    let b = Blob::random(24 * MIB);
    up.add_blob(b.data.clone());
    // Many small frames, so the stuck reader's queue fills long before the
    // end of the blob.
    up.fault(&b.digest, BodyFault::Frames(64 * 1024));
    let path = format!("/v2/library/x/blobs/{}", b.digest);
    up.delay(&path, Duration::from_millis(300));
    let st = start_stowage(&up.url(), "timeout = \"1s\"").await;
    st.hooks.inject_write_failure(Some(MIB as u64));

    let mut stuck = stuck_client(st.addr, &path).await;
    wait_until("the fill reached upstream", || up.blob_gets(&b.digest) == 1).await;
    let started = std::time::Instant::now();
    let r = client()
        .get(st.blob_url("library/x", &b.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = within(20, "the reader that reads", r.bytes())
        .await
        .unwrap();
    assert_eq!(sha256_digest(&body), b.digest);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "the fill was held up by a stuck reader: {:?}",
        started.elapsed()
    );
    assert_eq!(up.blob_gets(&b.digest), 1, "one upstream GET for both");
    // The stuck reader was cut: its connection ends short of the blob.
    let mut got = Vec::new();
    // Ends with EOF or a reset: either way short of the blob.
    let _ = within(
        20,
        "the stuck reader's connection ends",
        stuck.read_to_end(&mut got),
    )
    .await;
    // What it got is what reached the disk (1 MiB), its queue (at most
    // 4 MiB) and the buffers of its connection (the kernel's send buffer,
    // at most 4 MiB by default): its queue counted chunks, not bytes, and
    // held up to 64 of upstream's reads (24 MiB seen here).
    assert!(
        got.len() < 12 * MIB,
        "the stuck reader held {} bytes",
        got.len()
    );
}

/// Requests arriving after a fill lost its disk (it can no longer serve
/// them from the start) share one new fill instead of one upstream GET
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_of_a_spilling_fill_share_one_new_fill() {
    let up = FakeUpstream::start().await;
    let b = Blob::random(8 * MIB);
    up.add_blob(b.data.clone());
    let hold = up.hold(&b.digest);
    up.delay(
        &format!("/v2/library/x/blobs/{}", b.digest),
        Duration::from_millis(300),
    );
    let st = start_stowage(&up.url(), "").await;
    st.hooks.inject_write_failure(Some(MIB as u64));
    let url = st.blob_url("library/x", &b.digest);
    // The first reader reports how far it got.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let first = {
        let (url, b) = (url.clone(), b.clone());
        tokio::spawn(async move {
            let mut r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut body = Vec::new();
            while let Some(chunk) = r.chunk().await.unwrap() {
                body.extend_from_slice(&chunk);
                progress_tx.send_replace(body.len());
            }
            assert_eq!(sha256_digest(&body), b.digest);
        })
    };
    // Past the disk failure at 1 MiB: the first fill is spilling.
    within(
        10,
        "the first reader past the disk failure",
        progress.wait_for(|n| *n > 2 * MIB),
    )
    .await
    .unwrap();
    let mut late = Vec::new();
    for _ in 0..6 {
        let (url, b) = (url.clone(), b.clone());
        late.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            assert_eq!(sha256_digest(&body), b.digest);
        }));
    }
    hold.wait_half_sent(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    hold.release();
    within(30, "the first reader", first).await.unwrap();
    for r in late {
        within(30, "every late reader", r).await.unwrap();
    }
    assert_eq!(
        up.blob_gets(&b.digest),
        2,
        "late joiners went upstream one by one"
    );
}

/// Filesystem calls on the request path run off the runtime's workers and
/// outside the fill table's lock: with every open of the store taking a
/// second (a slow or hung disk), hits and misses of several blobs proceed
/// side by side and a request that needs no disk is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_disk_blocks_neither_the_runtime_nor_the_fill_table() {
    let up = FakeUpstream::start().await;
    let stored: Vec<Blob> = (0..4).map(|_| Blob::random(100 * KIB)).collect();
    let missing: Vec<Blob> = (0..4).map(|_| Blob::random(100 * KIB)).collect();
    for b in stored.iter().chain(&missing) {
        up.add_blob(b.data.clone());
    }
    let st = start_stowage(&up.url(), "").await;
    for b in &stored {
        fetch(&st, b).await;
    }
    let hooks = st.hooks.clone();
    wait_until("index loaded", || hooks.index_loaded()).await;
    st.hooks.inject_disk_latency(Some(Duration::from_secs(1)));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for b in stored.iter().chain(&missing) {
        let (url, b) = (st.blob_url("library/x", &b.digest), b.clone());
        tasks.push(tokio::spawn(async move {
            let (_, body) = get_ok(&client(), &url).await;
            assert_eq!(sha256_digest(&body), b.digest);
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ping = std::time::Instant::now();
    let r = within(
        10,
        "GET /v2/ during slow disk calls",
        client().get(st.v2("")).send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        ping.elapsed() < Duration::from_millis(900),
        "GET /v2/ waited {:?} behind disk calls on the runtime",
        ping.elapsed()
    );
    for t in tasks {
        within(20, "blobs on a slow disk", t).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "8 requests on a disk with 1 s calls took {:?}: serialised",
        started.elapsed()
    );
    st.hooks.inject_disk_latency(None);
}

/// Bytes of the files of fills in progress.
fn tmp_bytes(cache: &Path) -> u64 {
    std::fs::read_dir(stowage::test_hooks::tmp_dir(cache))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes of the files in `tmp/` and in the blob store, each file (inode)
/// once: a file renamed from one to the other between the two listings is
/// not counted twice.
fn disk_bytes(cache: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    fn walk(p: &Path, seen: &mut HashMap<u64, u64>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                walk(&e.path(), seen);
            } else {
                seen.insert(m.ino(), m.len());
            }
        }
    }
    let mut seen = HashMap::new();
    walk(&stowage::test_hooks::tmp_dir(cache), &mut seen);
    walk(&stowage::test_hooks::blobs_dir(cache), &mut seen);
    seen.values().sum()
}

/// A client GETting `b` in a task of its own: checks the status and the
/// bytes, and keeps in `got` how many it has received so far.
fn counted_get(
    st: &Stowage,
    b: &Blob,
    got: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let (url, b) = (st.blob_url("library/x", &b.digest), b.clone());
    tokio::spawn(async move {
        let mut r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.expect("the whole body") {
            body.extend_from_slice(&chunk);
            got.store(body.len(), std::sync::atomic::Ordering::Relaxed);
        }
        assert_eq!(sha256_digest(&body), b.digest, "served bytes");
    })
}

/// Fills in flight never take the disk past the budget, however many run
/// at once, and still share one upstream fetch per blob: a fill that would
/// not fit next to those in flight waits (joinable) for them to end. Before,
/// three held 3 MiB fills put 4.5 MiB on a 4 MiB budget, and would have put
/// 3 x 3 MiB there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fills_in_flight_stay_within_the_budget() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    let up = FakeUpstream::start().await;
    let blobs: Vec<Blob> = (0..3).map(|_| Blob::random(3 * MIB)).collect();
    let holds: Vec<Hold> = blobs
        .iter()
        .map(|b| {
            up.add_blob(b.data.clone());
            up.hold(&b.digest)
        })
        .collect();
    let max = 4 * MIB as u64;
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"4MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();

    // The most the disk held at any moment (sampled).
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, cache) = (peak.clone(), sampling.clone(), cache.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(disk_bytes(&cache), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    // Two clients for each blob.
    let mut clients = Vec::new();
    let mut received = Vec::new();
    for b in blobs.iter().chain(&blobs) {
        let got = Arc::new(AtomicUsize::new(0));
        received.push(got.clone());
        clients.push(counted_get(&st, b, got));
    }
    // One fill runs (its clients get the first half); the others wait.
    let half = 3 * MIB / 2;
    wait_until("the first half of one blob", || {
        received.iter().any(|g| g.load(Ordering::Relaxed) >= half)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = received
        .iter()
        .filter(|g| g.load(Ordering::Relaxed) > 0)
        .count();
    assert_eq!(started, 2, "the clients of one blob only");
    assert!(st.hooks.used() + st.hooks.reserved() <= max);

    for h in &holds {
        h.release();
    }
    for c in clients {
        within(30, "the clients' bodies", c).await.unwrap();
    }
    let hooks = st.hooks.clone();
    wait_until("fills end", || hooks.fills_in_flight() == 0).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= max,
        "{peak} bytes on disk at the peak, budget {max}"
    );
    let stored = store_bytes(&cache);
    assert!(stored <= max, "{stored} bytes stored, budget {max}");
    assert_eq!(st.hooks.used(), stored, "index usage matches the disk");
    assert_eq!(st.hooks.reserved(), 0, "no reservation left behind");
    assert_eq!(tmp_bytes(&cache), 0);
    for b in &blobs {
        assert_eq!(up.blob_gets(&b.digest), 1, "one upstream GET per blob");
    }
    // Each was stored in turn (not streamed without caching): the two
    // older ones evicted for the next.
    assert_eq!(st.hooks.evicted_blobs(), 2);
}

/// Files of `cache` this process holds open although they were deleted.
fn deleted_but_open(cache: &Path) -> Vec<String> {
    let prefix = cache.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with(&prefix) && p.ends_with(" (deleted)"))
        .collect()
}

/// A blob kept open after a hit (the few last opened are) and then evicted
/// to make room for a fill is let go of, so its disk space is freed with
/// the eviction. Before, only the evictor's own evictions let go of them,
/// and a fill's eviction left the file open, its bytes on disk, uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_evicted_for_a_fill_are_not_kept_open() {
    let up = FakeUpstream::start().await;
    let (a, b) = (Blob::random(2 * MIB), Blob::random(3 * MIB));
    up.add_blob(a.data.clone());
    up.add_blob(b.data.clone());
    let dir = TempDir::new().unwrap();
    // The evictor is not woken before the budget is full: the fill evicts.
    let toml = cache_toml(
        dir.path(),
        &up.url(),
        "max_size = \"4MiB\"\nhigh_watermark = 1.0\nlow_watermark = 0.9",
    );
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();
    fetch(&st, &a).await;
    fetch(&st, &a).await; // a hit: its file is kept open
    fetch(&st, &b).await; // 2 + 3 MiB: a is evicted while b fills
    assert!(!blob_file(&cache, &a.digest).exists(), "a was evicted");
    let c = cache.clone();
    wait_until("the evicted blob's file is closed", || {
        deleted_but_open(&c).is_empty()
    })
    .await;
}

/// Fills wait for admission in line: a large blob waiting for room is not
/// passed over by smaller ones that arrive after it (they would fit, and
/// with a steady stream of them the large one was never cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fills_waiting_for_room_are_admitted_in_turn() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let up = FakeUpstream::start().await;
    let first = Blob::random(MIB);
    let big = Blob::random(3 * MIB + MIB / 2);
    let small: Vec<Blob> = (0..2).map(|_| Blob::random(MIB)).collect();
    for b in [&first, &big].into_iter().chain(&small) {
        up.add_blob(b.data.clone());
    }
    let hold = up.hold(&first.digest);
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"4MiB\"");
    let st = start_stowage_toml(dir, &toml).await;

    let get = |b: &Blob, got: Arc<AtomicUsize>| counted_get(&st, b, got);
    let counters: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut clients = vec![get(&first, counters[0].clone())];
    hold.wait_half_sent(1).await;
    // 1 + 3.5 MiB do not fit in 4: the big blob waits.
    clients.push(get(&big, counters[1].clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 1 + 1 + 1 MiB would fit, but they come after the big one.
    for (b, got) in small.iter().zip(&counters[2..]) {
        clients.push(get(b, got.clone()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting: Vec<usize> = counters[1..]
        .iter()
        .map(|g| g.load(Ordering::Relaxed))
        .collect();
    assert_eq!(
        waiting,
        vec![0, 0, 0],
        "bytes received while the first fill holds"
    );

    hold.release();
    for c in clients {
        within(30, "the clients' bodies", c).await.unwrap();
    }
    for b in [&first, &big].into_iter().chain(&small) {
        assert_eq!(up.blob_gets(&b.digest), 1, "one upstream GET per blob");
    }
}

/// `HEAD` on a blob whose fill waits for room in the budget is answered from
/// the fill, which has upstream's answer and so the size: upstream is not
/// asked again. Before, the size was published only once the fill streamed,
/// so every `HEAD` during the wait (up to the upstream timeout) went
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn head_of_a_blob_waiting_for_room_is_answered_from_its_fill() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let up = FakeUpstream::start().await;
    let first = Blob::random(MIB);
    let big = Blob::random(3 * MIB + MIB / 2);
    for b in [&first, &big] {
        up.add_blob(b.data.clone());
    }
    let hold = up.hold(&first.digest);
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"4MiB\"");
    let st = start_stowage_toml(dir, &toml).await;

    let got_first = Arc::new(AtomicUsize::new(0));
    let got_big = Arc::new(AtomicUsize::new(0));
    let c1 = counted_get(&st, &first, got_first);
    hold.wait_half_sent(1).await;
    // 1 + 3.5 MiB do not fit in 4: the big blob's fill has upstream's
    // answer and waits for room.
    let c2 = counted_get(&st, &big, got_big.clone());
    wait_until("the big blob's upstream GET", || {
        up.blob_gets(&big.digest) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(got_big.load(Ordering::Relaxed), 0, "the big blob waits");

    let url = st.blob_url("library/x", &big.digest);
    for _ in 0..3 {
        let r = within(10, "HEAD", client().head(&url).send())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "content-length").as_deref(),
            Some(big.data.len().to_string().as_str())
        );
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(big.digest.as_str())
        );
    }
    assert_eq!(
        up.blob_heads(&big.digest),
        0,
        "HEAD answered from the waiting fill, not by upstream"
    );

    hold.release();
    for c in [c1, c2] {
        within(30, "the clients' bodies", c).await.unwrap();
    }
    assert_eq!(up.blob_gets(&big.digest), 1, "one upstream GET");
}

/// A fill that leaves the disk (a write failed) gives back its admission:
/// the next request for the blob leads a new fill (it cannot join one that
/// spills), which is admitted at once. Before, it waited for the first
/// fill's slowest reader, up to the upstream timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_that_left_the_disk_does_not_hold_its_room() {
    let up = FakeUpstream::start().await;
    // Larger than the stalled reader's queue and socket buffers take, and
    // than half the budget.
    let b = Blob::random(40 * MIB);
    up.add_blob(b.data.clone());
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"64MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    st.hooks.inject_write_failure(Some(MIB as u64));
    let url = st.blob_url("library/x", &b.digest);
    // A reader that reads nothing past the headers holds the first fill.
    let stalled = client().get(&url).send().await.unwrap();
    assert_eq!(stalled.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = within(10, "a second client, served by a new fill", async {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("the whole body")
    })
    .await;
    assert_eq!(sha256_digest(&r), b.digest);
    drop(stalled);
}

/// A stored blob damaged on disk while stowage runs (truncated, or grown)
/// is not served: its size no longer matches the one recorded when it was
/// verified, so it is dropped and fetched again, also when its file is
/// kept open for hits. A truncated one was served as a clean, short 200,
/// again and again; one kept open failed every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_blob_damaged_on_disk_is_fetched_again() {
    let up = FakeUpstream::start().await;
    let (a, b) = (Blob::random(300 * KIB), Blob::random(300 * KIB));
    for x in [&a, &b] {
        up.add_blob(x.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"10MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    // Each fetched twice: the second, a hit, keeps its file open.
    for x in [&a, &b] {
        fetch(&st, x).await;
        fetch(&st, x).await;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_file(st.dir.path(), &a.digest))
        .unwrap();
    file.set_len(1000).unwrap();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(blob_file(st.dir.path(), &b.digest))
        .unwrap();
    std::io::Write::write_all(&mut &file, b"more").unwrap();
    for x in [&a, &b] {
        fetch(&st, x).await; // checks the bytes
        fetch(&st, x).await;
        assert_eq!(up.blob_gets(&x.digest), 2);
        let stored = std::fs::read(blob_file(st.dir.path(), &x.digest)).unwrap();
        assert_eq!(sha256_digest(&stored), x.digest);
    }
}

/// A stored blob damaged on disk without changing size (a flipped byte,
/// its file kept open for hits) is found by the scrubber, which hashes the
/// stored blobs again in the background: it is dropped, and fetched again
/// at its next request. Before, it was served damaged (and refused by every
/// client that verifies it) until an operator purged it. Its undamaged
/// neighbour stays cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_damaged_on_disk_at_its_size_is_found_by_the_scrubber() {
    let up = FakeUpstream::start().await;
    let (a, b) = (Blob::random(300 * KIB), Blob::random(300 * KIB));
    for x in [&a, &b] {
        up.add_blob(x.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "scrub_interval = \"1s\"")
        .replace("admin_listen = \"off\"", "admin_listen = \"127.0.0.1:0\"");
    let st = start_stowage_toml(dir, &toml).await;
    // Each fetched twice: the second, a hit, keeps its file open.
    for x in [&a, &b] {
        fetch(&st, x).await;
        fetch(&st, x).await;
    }
    let path = blob_file(st.dir.path(), &a.digest);
    damage(st.dir.path(), &a);
    metric_becomes(&st, "stowage_cache_damaged_blobs_total", &[], 1.0).await;
    assert!(!path.exists(), "the damaged file is removed");
    fetch(&st, &a).await; // checks the bytes
    assert_eq!(up.blob_gets(&a.digest), 2, "fetched again");
    let stored = std::fs::read(&path).unwrap();
    assert_eq!(sha256_digest(&stored), a.digest);
    fetch(&st, &b).await;
    assert_eq!(
        up.blob_gets(&b.digest),
        1,
        "the undamaged blob stays cached"
    );
    // Both blobs are hashed, by this pass or the next. Not read at once:
    // a pass that walked past `b`'s slice while `b` was being stored (the
    // first starts 1 s after start-up, when a slow start is still
    // fetching) hashes it only in the next pass, after `a` was found.
    metric_reaches(
        &st,
        "stowage_cache_scrubbed_bytes_total",
        &[],
        (600 * KIB) as f64,
    )
    .await;
}

/// Flips one byte of a stored blob's file, keeping its size.
fn damage(cache: &Path, b: &Blob) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_file(cache, &b.digest))
        .unwrap();
    file.write_all_at(&[b.data[1000] ^ 0xff], 1000).unwrap();
}

/// A scrub pass cut short by a restart goes on where it stopped
/// (`<cache>/scrub`), instead of from the first slice again: a cache whose
/// pass outlasts the process's uptime would never have its last slices
/// checked. Two blobs damaged while stowage was stopped, the note naming
/// the slice of the later one: the first pass after the start finds that
/// one, and the earlier one is found only by the next pass, which starts
/// from the first slice. A finished pass leaves `00`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_pass_goes_on_after_a_restart_where_it_stopped() {
    let up = FakeUpstream::start().await;
    // `early` in a slice from 00 to 7f, `late` in one from 80 to ff.
    let pick = |early: bool| loop {
        let b = Blob::random(300 * KIB);
        if (b.digest.as_bytes()["sha256:".len()] < b'8') == early {
            return b;
        }
    };
    let (early, late) = (pick(true), pick(false));
    for x in [&early, &late] {
        up.add_blob(x.data.clone());
    }
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "scrub_interval = \"3s\"")
        .replace("admin_listen = \"off\"", "admin_listen = \"127.0.0.1:0\"");
    let st = start_stowage_toml(dir, &toml).await;
    for x in [&early, &late] {
        fetch(&st, x).await;
    }
    let dir = st.stop().await;
    for x in [&early, &late] {
        damage(dir.path(), x);
    }
    let note = dir.path().join("scrub");
    let slice = &late.digest["sha256:".len()..][..2];
    std::fs::write(&note, format!("{slice}\n")).unwrap();
    let st = start_stowage_toml(dir, &toml).await;
    let cache = st.dir.path().to_path_buf();
    metric_becomes(&st, "stowage_cache_damaged_blobs_total", &[], 1.0).await;
    assert!(
        !blob_file(&cache, &late.digest).exists(),
        "the first pass went on from the noted slice {slice}"
    );
    assert!(
        blob_file(&cache, &early.digest).exists(),
        "the first pass started at slice {slice}, after the earlier blob's"
    );
    metric_becomes(&st, "stowage_cache_damaged_blobs_total", &[], 2.0).await;
    assert!(!blob_file(&cache, &early.digest).exists());
    for x in [&early, &late] {
        fetch(&st, x).await;
        assert_eq!(up.blob_gets(&x.digest), 2, "fetched again");
    }
    wait_until("a finished pass to note slice 00", || {
        std::fs::read_to_string(&note).is_ok_and(|t| t == "00\n")
    })
    .await;
}

/// Pinned blobs stay pinned across a restart even when the pin cannot be
/// resolved after it (its tag deleted upstream): the pinned set is kept on
/// disk. They were evicted: only a pin resolved since the start counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_blobs_stay_pinned_after_a_restart_when_the_pin_cannot_be_resolved() {
    let (up, img, others, st, toml) = pinned_image_cached().await;
    up.respond(
        "/v2/library/pinned/manifests/1",
        404,
        &[("content-type", "application/json")],
        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"gone"}]}"#,
    );
    let dir = st.stop().await;
    let st = start_stowage_toml(dir, &toml).await;
    pinned_blobs_outlast(&st, &up, &img, &others).await;
    for b in img.blobs() {
        assert!(st.hooks.is_pinned(&b.digest));
    }
}

/// Makes a file immutable (`chattr +i`: not even root may remove it, as on
/// a file system that went read-only) until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: PathBuf) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .expect("running chattr(1)");
        assert!(ok.success(), "chattr +i {} (needs root)", path.display());
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A damaged stored blob that cannot be removed (an immutable file, as
/// on a file system remounted read-only after errors) is served from
/// upstream, right, each time; it was a 500 on every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_that_cannot_be_removed_is_served_from_upstream() {
    let up = FakeUpstream::start().await;
    let a = Blob::random(300 * KIB);
    up.add_blob(a.data.clone());
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"10MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    fetch(&st, &a).await;
    let path = blob_file(st.dir.path(), &a.digest);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let _immutable = Immutable::set(path);
    for n in 2..4 {
        fetch(&st, &a).await; // checks the bytes
        assert_eq!(up.blob_gets(&a.digest), n);
    }
}

/// After a restart, a blob truncated on disk while stowage was stopped is
/// not served before the start-up scan has checked it: its journal record
/// says it is not whole, so it is dropped and fetched again. It was served
/// as a clean, short 200 until the scan reached it (minutes on a large
/// cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_damaged_while_stopped_is_not_served_before_the_scan_checks_it() {
    let up = FakeUpstream::start().await;
    let a = Blob::random(300 * KIB);
    up.add_blob(a.data.clone());
    let dir = TempDir::new().unwrap();
    let toml = cache_toml(dir.path(), &up.url(), "max_size = \"10MiB\"");
    let st = start_stowage_toml(dir, &toml).await;
    fetch(&st, &a).await;
    let dir = st.stop().await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(blob_file(dir.path(), &a.digest))
        .unwrap()
        .set_len(1000)
        .unwrap();
    /// Releases the scan however the test ends (a held scan would keep
    /// the runtime, and the test, from ever ending).
    struct Held(PathBuf);
    impl Drop for Held {
        fn drop(&mut self) {
            stowage::test_hooks::hold_startup_scan(&self.0, false);
        }
    }
    let cache = dir.path().to_path_buf();
    stowage::test_hooks::hold_startup_scan(&cache, true);
    let held = Held(cache);
    let st = start_stowage_toml(dir, &toml).await;
    assert!(!st.hooks.index_loaded());
    fetch(&st, &a).await; // checks the bytes
    assert_eq!(up.blob_gets(&a.digest), 2);
    assert!(!st.hooks.index_loaded(), "served before the scan ended");
    drop(held);
    let hooks = st.hooks.clone();
    wait_until("the scan ends", || hooks.index_loaded()).await;
    fetch(&st, &a).await;
    assert_eq!(up.blob_gets(&a.digest), 2);
}
