//! Operator commands of the real binary: `stowage warm` against a running
//! mirror, and `stowage cache stats|ls|purge` on its cache directory.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cache_args(dir: &Path, rest: &[&str]) -> Vec<String> {
    let mut v = vec!["cache".to_string()];
    v.extend(rest.iter().map(|s| s.to_string()));
    v.push("--cache-dir".into());
    v.push(dir.to_str().unwrap().into());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_then_inspect_and_purge_the_cache() {
    let up = FakeUpstream::start().await;
    let amd = make_image_for(Format::Oci, &[100_000, 50_000], "amd64");
    let arm = make_image_for(Format::Oci, &[70_000], "arm64");
    let index = make_index(
        Format::Oci,
        vec![(amd.clone(), "amd64"), (arm.clone(), "arm64")],
    );
    up.push_index("library/multi", "1", &index);
    // Exact counts of what the pull itself causes: no prefetch.
    let st = start_stowage_no_prefetch(&up.url(), "").await;

    // One platform only.
    let o = run_stowage(vec![
        "warm".into(),
        "--mirror".into(),
        st.url(),
        "--platform".into(),
        "linux/arm64".into(),
        "multi:1".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("2 blobs: 2 fetched"), "{}", text(&o));
    for b in arm.blobs() {
        assert_eq!(up.blob_gets(&b.digest), 1, "arm64 blob warmed");
    }
    for b in amd.layers.iter() {
        assert_eq!(up.blob_gets(&b.digest), 0, "amd64 layer not warmed");
    }

    // All platforms: the arm64 blobs are reported as already cached.
    let o = run_stowage(vec![
        "warm".into(),
        "--mirror".into(),
        st.url(),
        "docker.io/library/multi:1".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("5 blobs: 3 fetched"), "{}", text(&o));
    assert!(text(&o).contains("2 already cached"), "{}", text(&o));
    assert_eq!(up.all_blob_gets(), 5, "each blob fetched upstream once");

    // Unknown image: a clear failure.
    let o = run_stowage(vec![
        "warm".into(),
        "--mirror".into(),
        st.url(),
        "nothere:1".into(),
    ])
    .await;
    assert!(!o.status.success());
    assert!(text(&o).contains("404"), "{}", text(&o));

    let dir = st.dir.path();
    let o = run_stowage(cache_args(dir, &["stats"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("blobs:           5"), "{}", text(&o));

    let o = run_stowage(cache_args(dir, &["ls", "--sort", "size", "-n", "1"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&amd.layers[0].digest),
        "largest blob first: {}",
        text(&o)
    );
    assert_eq!(text(&o).lines().count(), 2, "header and one row");

    // Purge one blob by digest while the mirror runs: it is fetched again.
    let o = run_stowage(cache_args(dir, &["purge", &amd.layers[1].digest])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("removed 1 blobs"), "{}", text(&o));
    let r = client()
        .get(st.blob_url("library/multi", &amd.layers[1].digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), amd.layers[1].digest);
    assert_eq!(up.blob_gets(&amd.layers[1].digest), 2);

    // Purge the repository: its tag, manifests and blobs go.
    let o = run_stowage(cache_args(dir, &["purge", "multi"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("3 manifests, 1 tags"), "{}", text(&o));
    let o = run_stowage(cache_args(dir, &["stats"])).await;
    assert!(text(&o).contains("blobs:           0"), "{}", text(&o));
}

/// `purge repo@digest` removes that manifest and its blobs, not the
/// repository's tags (another tag, and its image, stay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_repository_and_digest_keeps_the_tags() {
    let up = FakeUpstream::start().await;
    let one = make_image(Format::Oci, &[10_000]);
    let two = make_image(Format::Oci, &[20_000]);
    up.push_image("library/app", "one", &one);
    up.push_image("library/app", "two", &two);
    let st = start_stowage_no_prefetch(&up.url(), "").await;
    let c = client();
    for (tag, img) in [("one", &one), ("two", &two)] {
        check_manifest(&c, &st, "app", tag, &img.manifest, OCI_MANIFEST).await;
        for b in img.blobs() {
            let (_, body) = get_ok(&c, &st.blob_url("library/app", &b.digest)).await;
            assert_eq!(body, b.data);
        }
    }
    let dir = st.dir.path();
    let target = format!("docker.io/library/app@{}", one.digest);
    let o = run_stowage(cache_args(dir, &["purge", &target])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("removed 2 blobs") && text(&o).contains("1 manifests, 0 tags"),
        "{}",
        text(&o)
    );
    for b in two.blobs() {
        assert!(
            stowage::test_hooks::blob_path(dir, &b.digest).exists(),
            "the other image's blob {} stays",
            b.digest
        );
    }
}

/// `stowage warm` in front of a passthrough upstream: with the registry's
/// credentials it answers the relayed challenge at the registry's token
/// service and warms a private image (each blob fetched once); without
/// them it is refused and nothing private is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_through_a_passthrough_upstream_needs_the_registrys_credentials() {
    let up = FakeUpstream::start().await;
    up.enable_auth(300);
    up.set_credentials("owner", "pw");
    up.set_private("acme/private");
    let img = make_image(Format::Oci, &[10_000, 20_000]);
    up.push_image("acme/private", "v1", &img);
    let st = start_stowage(&up.url(), "auth = \"passthrough\"").await;
    let warm = |creds: bool| {
        let mut args = vec!["warm".to_string(), "--mirror".into(), st.url()];
        if creds {
            args.extend([
                "--username".into(),
                "owner".into(),
                "--password".into(),
                "pw".into(),
            ]);
        }
        args.push("acme/private:v1".into());
        run_stowage(args)
    };
    let o = warm(false).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("401"), "{}", text(&o));
    assert_eq!(up.all_blob_gets(), 0);
    let o = warm(true).await;
    assert!(o.status.success(), "{}", text(&o));
    // Fetched by warm's own requests or by the prefetch its manifest GET
    // started (which warm then counts as cached): each once, either way.
    assert!(text(&o).contains("3 blobs: "), "{}", text(&o));
    for b in img.blobs() {
        assert_eq!(up.blob_gets(&b.digest), 1);
    }
    // warm, as a client, asked the token service with the owner's credentials.
    let t = up.last_token_request().unwrap();
    assert!(
        t.header("authorization")
            .is_some_and(|a| a.starts_with("Basic "))
    );
}

/// Issue 11, item 3: a second stowage on the same cache directory would
/// empty the first one's `tmp/` (and race its journal). It must refuse to
/// start, naming the directory and the holder's pid, and leave the first
/// one's files alone; the operator commands still work next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_cache_dir_exits_naming_the_holder() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    let cache = dir.path().join("cache");
    std::fs::write(&config, config_toml(&cache, &up.url(), "")).unwrap();
    let mut first = Process::with_config(&config, &[]);
    let addr = first.listening_addr();
    // A fill of the first instance in progress.
    let marker = cache.join("tmp").join("fill-in-progress");
    std::fs::write(&marker, b"partial").unwrap();

    let mut second = Process::with_config(&config, &[]);
    let status = within(20, "the second instance exits", async {
        loop {
            if let Some(s) = second.try_wait() {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let log = second.log().join("\n");
    assert!(!status.success(), "second instance exited {status}: {log}");
    assert!(
        log.contains(cache.to_str().unwrap()),
        "names the directory: {log}"
    );
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "names the holder's pid {}: {log}",
        first.pid()
    );
    assert!(marker.exists(), "the first instance's tmp/ was left alone");
    assert!(first.is_running());
    wait_http_ok(&format!("http://{addr}/v2/")).await;

    // The operator commands do not take the lock.
    let o = run_stowage(cache_args(&cache, &["stats"])).await;
    assert!(o.status.success(), "{}", text(&o));
    let o = run_stowage(cache_args(&cache, &["ls"])).await;
    assert!(o.status.success(), "{}", text(&o));

    // Once the first one is gone, the directory can be used again.
    first.signal("TERM");
    within(20, "the first instance stops", async {
        while first.is_running() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut third = Process::with_config(&config, &[]);
    let addr = third.listening_addr();
    wait_http_ok(&format!("http://{addr}/v2/")).await;
}

/// `cache purge` while the server runs: the server notices, forgets the
/// purged blob (its bytes leave the budget at once) and lets go of the
/// file it kept open for hits, so the next request fetches it again. It
/// kept counting the purged bytes, evicting live blobs for them, and
/// served the purged blob from its open file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_notices_a_purge() {
    let up = FakeUpstream::start().await;
    let (a, b, c) = (
        Blob::random(400_000),
        Blob::random(300_000),
        Blob::random(300_000),
    );
    for x in [&a, &b, &c] {
        up.add_blob(x.data.clone());
    }
    let dir = tempfile::TempDir::new().unwrap();
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"off\"\ncache_dir = {dir:?}\nprefetch = false\n\
         [cache]\nmax_size = \"1000000B\"\nhigh_watermark = 0.9\nlow_watermark = 0.6\n\
         [[upstream]]\nhost = \"docker.io\"\nurl = \"{url}\"\nlibrary_prefix = true\n",
        dir = dir.path().to_str().unwrap(),
        url = up.url()
    );
    let st = start_stowage_toml(dir, &toml).await;
    let c2 = client();
    let get = async |x: &Blob| {
        let (h, body) = get_ok(&c2, &st.blob_url("library/x", &x.digest)).await;
        assert_eq!(body, x.data);
        let hooks = st.hooks.clone();
        within(10, "fills done", async {
            while hooks.fills_in_flight() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        h.get("x-stowage-cache")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    get(&b).await;
    get(&a).await;
    assert_eq!(get(&a).await, "hit");
    assert_eq!(st.hooks.used(), 700_000);
    let o = run_stowage(cache_args(st.dir.path(), &["purge", &a.digest])).await;
    assert!(o.status.success(), "{}", text(&o));
    let hooks = st.hooks.clone();
    within(10, "the purged bytes leave the budget", async {
        while hooks.used() != 300_000 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(get(&a).await, "miss");
    assert_eq!(up.blob_gets(&a.digest), 2);
    // 700 kB held again; C fits under the high watermark once A's 400 kB
    // go (LRU: B is older than A, but A was purged, not B... B stays only
    // if the purged bytes were not counted).
    let o = run_stowage(cache_args(st.dir.path(), &["purge", &a.digest])).await;
    assert!(o.status.success(), "{}", text(&o));
    within(10, "the purged bytes leave the budget", async {
        while hooks.used() != 300_000 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    get(&c).await;
    assert!(
        stowage::test_hooks::blob_path(st.dir.path(), &b.digest).exists(),
        "a live blob evicted for purged bytes"
    );
    assert_eq!(hooks.evicted_blobs(), 0);
}

/// A mistyped digest or cache directory is an error (exit 1, saying
/// what), not a purge of nothing that succeeds: `sha256:0123abcd` was
/// taken as the repository `library/sha256` with a tag, and a missing
/// directory as an empty cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistyped_purge_targets_and_cache_dirs_are_errors() {
    let dir = tempfile::TempDir::new().unwrap();
    let upper = format!("sha256:{}", "AB".repeat(32));
    for target in ["sha256:0123abcd", upper.as_str(), "sha512:00"] {
        let o = run_stowage(cache_args(dir.path(), &["purge", target])).await;
        assert_eq!(o.status.code(), Some(1), "{target}: {}", text(&o));
        assert!(text(&o).contains("digest"), "{target}: {}", text(&o));
    }
    let missing = dir.path().join("no-such-dir");
    for args in [&["purge", "alpine"][..], &["ls"], &["stats"]] {
        let o = run_stowage(cache_args(&missing, args)).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("is not a cache directory"),
            "{args:?}: {}",
            text(&o)
        );
    }
    assert!(!missing.exists(), "nothing created");
}

/// Purging a tag or a repository leaves what other tags, other
/// repositories and pins still use: the store is shared by digest. It
/// removed the image's manifest and blobs although `app:b` and `other:1`
/// pointed at them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_tag_keeps_what_other_tags_and_repositories_use() {
    let up = FakeUpstream::start().await;
    let shared = make_image(Format::Oci, &[10_000, 20_000]);
    let own = make_image(Format::Oci, &[30_000]);
    up.push_image("library/app", "a", &shared);
    up.push_image("library/app", "b", &shared);
    up.push_image("library/other", "1", &shared);
    up.push_image("library/app", "own", &own);
    let st = start_stowage_no_prefetch(&up.url(), "").await;
    let c = client();
    for (repo, tag, img) in [
        ("app", "a", &shared),
        ("app", "b", &shared),
        ("other", "1", &shared),
        ("app", "own", &own),
    ] {
        check_manifest(&c, &st, repo, tag, &img.manifest, OCI_MANIFEST).await;
        for b in img.blobs() {
            let (_, body) = get_ok(&c, &st.blob_url(&format!("library/{repo}"), &b.digest)).await;
            assert_eq!(body, b.data);
        }
    }
    let dir = st.dir.path();
    let stored = |img: &Image| {
        img.blobs()
            .iter()
            .all(|b| stowage::test_hooks::blob_path(dir, &b.digest).exists())
            && stowage::test_hooks::manifest_path(dir, &img.digest).exists()
    };
    let o = run_stowage(cache_args(dir, &["purge", "docker.io/library/app:a"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        stored(&shared),
        "app:b and other:1 still use it: {}",
        text(&o)
    );
    // The whole repository: `own` goes, `shared` stays for other:1.
    let o = run_stowage(cache_args(dir, &["purge", "docker.io/library/app"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(stored(&shared), "other:1 still uses it: {}", text(&o));
    assert!(
        own.blobs()
            .iter()
            .all(|b| !stowage::test_hooks::blob_path(dir, &b.digest).exists()),
        "{}",
        text(&o)
    );
    // The last user: gone.
    let o = run_stowage(cache_args(dir, &["purge", "docker.io/library/other:1"])).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        shared
            .blobs()
            .iter()
            .all(|b| !stowage::test_hooks::blob_path(dir, &b.digest).exists()),
        "{}",
        text(&o)
    );
}

/// A purge that fails part-way (a blob whose file cannot be removed: a
/// directory stands in its place) has removed files all the same: it
/// exits 1, and the running instance is told and forgets them (their
/// bytes leave its budget). It was told only when the whole purge
/// succeeded, and kept counting the removed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_that_fails_part_way_still_tells_the_running_server() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10_000, 20_000]);
    up.push_image("library/app", "1", &img);
    let st = start_stowage_no_prefetch(&up.url(), "").await;
    let c = client();
    check_manifest(&c, &st, "app", "1", &img.manifest, OCI_MANIFEST).await;
    for b in img.blobs() {
        let (_, body) = get_ok(&c, &st.blob_url("library/app", &b.digest)).await;
        assert_eq!(body, b.data);
    }
    let hooks = st.hooks.clone();
    let size = |bs: &[&Blob]| bs.iter().map(|b| b.data.len() as u64).sum::<u64>();
    let blobs = img.blobs();
    within(10, "fills committed", async {
        while hooks.used() != size(&blobs) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    // The purge removes the config, then the layers in order: the last
    // one's removal fails.
    let last = blobs.last().unwrap();
    let path = stowage::test_hooks::blob_path(st.dir.path(), &last.digest);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("x"), b"x").unwrap();
    let o = run_stowage(cache_args(
        st.dir.path(),
        &["purge", "docker.io/library/app:1"],
    ))
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    for b in &blobs[..blobs.len() - 1] {
        assert!(!stowage::test_hooks::blob_path(st.dir.path(), &b.digest).exists());
    }
    within(10, "the removed bytes leave the budget", async {
        while hooks.used() != size(&[last]) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    // Told by a file the instance can read whoever runs the command.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(st.dir.path().join("purged"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}
