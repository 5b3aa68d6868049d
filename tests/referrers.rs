//! Referrers and signatures through the mirror (issue 12, part 3): OCI
//! 1.1 referrers responses cached per (upstream, repository, digest,
//! artifactType filter) with the tag TTL, answered with the OCI index media
//! type and served stale when upstream is down; the tag-schema fallback
//! (`sha256-<hex>.sig` tags, as cosign writes) through the tag cache. The
//! fake upstream implements the referrers API (distribution 2.8 has none;
//! tests/e2e/negotiation.sh checks the tag schema against it).

mod common;

use std::time::Duration;

use common::*;

const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";

/// `app:v1` with a signature and an SBOM referring to it.
async fn signed() -> (FakeUpstream, Image, Image, Image) {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[100]);
    up.push_image("team/app", "v1", &img);
    let sig = make_artifact(&img, SIG);
    up.push_image_untagged("team/app", &sig);
    let sbom = make_artifact(&img, SBOM);
    up.push_image_untagged("team/app", &sbom);
    (up, img, sig, sbom)
}

/// GET (or HEAD) of `path` on stowage: status, headers, body.
async fn get(st: &Stowage, path: &str, head: bool) -> (u16, http::HeaderMap, bytes::Bytes) {
    let c = client();
    let url = st.v2(path);
    let r = if head { c.head(&url) } else { c.get(&url) }
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap())
}

/// The digests an index lists.
fn listed(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    let mut d: Vec<String> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    d.sort();
    d
}

fn referrer_gets(up: &FakeUpstream, subject: &str) -> usize {
    up.count_where(|r| r.method == "GET" && r.path.ends_with(&format!("/referrers/{subject}")))
}

fn hv<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// An upstream that paginates (one referrer a page): the mirror's `Link`
/// leads to the next page (asked upstream with `n` and `last`, not the
/// cached first page again), and the pages together list every referrer
/// once.
#[tokio::test]
async fn paginated_referrers_follow_the_link_page_by_page() {
    let (up, img, sig, sbom) = signed().await;
    up.set_referrers_page(1);
    let st = start_stowage(&up.url(), "").await;
    let mut path = format!("team/app/referrers/{}", img.digest);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, h, body) = get(&st, &path, false).await;
        assert_eq!(status, 200, "{path}");
        seen.extend(listed(&body));
        let Some(link) = hv(&h, "link") else { break };
        let target = link
            .strip_prefix("</v2/")
            .and_then(|l| l.split_once('>'))
            .map(|(t, _)| t.to_string())
            .unwrap_or_else(|| panic!("a Link this mirror can follow: {link}"));
        path = target;
    }
    let mut want = vec![sig.digest.clone(), sbom.digest.clone()];
    want.sort();
    assert_eq!(seen, want, "each referrer once, over two pages");
}

#[tokio::test]
async fn referrers_are_cached_with_the_tag_ttl() {
    let (up, img, sig, sbom) = signed().await;
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let path = format!("team/app/referrers/{}", img.digest);
    let (status, h, body) = get(&st, &path, false).await;
    assert_eq!(status, 200);
    assert_eq!(hv(&h, "content-type"), Some(OCI_INDEX));
    let mut want = vec![sig.digest.clone(), sbom.digest.clone()];
    want.sort();
    assert_eq!(listed(&body), want);
    assert_eq!(hv(&h, "x-stowage-cache"), Some("miss"));
    // Within the TTL: from the cache, GET and HEAD alike.
    for head in [false, true, false] {
        let (status, h, again) = get(&st, &path, head).await;
        assert_eq!(status, 200);
        assert_eq!(hv(&h, "x-stowage-cache"), Some("hit"));
        assert_eq!(hv(&h, "content-type"), Some(OCI_INDEX));
        assert_eq!(
            hv(&h, "content-length"),
            Some(body.len().to_string().as_str())
        );
        if !head {
            assert_eq!(again, body);
        }
    }
    assert_eq!(referrer_gets(&up, &img.digest), 1);
    // A new signature shows once the TTL has passed.
    let sig2 = make_artifact(&img, SIG);
    up.push_image_untagged("team/app", &sig2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, body) = get(&st, &path, false).await;
    assert_eq!(status, 200);
    assert_eq!(listed(&body).len(), 3);
    assert_eq!(referrer_gets(&up, &img.digest), 2);
}

/// `artifactType=` (empty) filters nothing: it is the unfiltered answer,
/// asked upstream without a filter (an upstream filtering literally would
/// list nothing), and shares its cache entry.
#[tokio::test]
async fn an_empty_artifact_type_is_no_filter() {
    let (up, img, sig, sbom) = signed().await;
    let st = start_stowage(&up.url(), "").await;
    let mut want = vec![sig.digest.clone(), sbom.digest.clone()];
    want.sort();
    for query in ["?artifactType=", ""] {
        let path = format!("team/app/referrers/{}{query}", img.digest);
        let (status, h, body) = get(&st, &path, false).await;
        assert_eq!(status, 200, "{query}");
        assert_eq!(listed(&body), want, "{query}");
        assert_eq!(hv(&h, "oci-filters-applied"), None, "{query}");
    }
    assert_eq!(referrer_gets(&up, &img.digest), 1);
}

#[tokio::test]
async fn each_artifact_type_filter_is_cached_apart() {
    let (up, img, sig, _) = signed().await;
    let st = start_stowage(&up.url(), "").await;
    let filtered = format!(
        "team/app/referrers/{}?artifactType={}",
        img.digest,
        form_encode(SIG)
    );
    let all = format!("team/app/referrers/{}", img.digest);
    for _ in 0..2 {
        let (status, h, body) = get(&st, &filtered, false).await;
        assert_eq!(status, 200);
        assert_eq!(listed(&body), vec![sig.digest.clone()]);
        assert_eq!(hv(&h, "oci-filters-applied"), Some("artifactType"));
        let (status, h, body) = get(&st, &all, false).await;
        assert_eq!(status, 200);
        assert_eq!(listed(&body).len(), 2);
        assert_eq!(hv(&h, "oci-filters-applied"), None);
    }
    assert_eq!(
        referrer_gets(&up, &img.digest),
        2,
        "one upstream GET per filter"
    );
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn referrers_are_served_stale_when_upstream_is_down_even_after_a_restart() {
    let (up, img, sig, sbom) = signed().await;
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let path = format!("team/app/referrers/{}", img.digest);
    let (_, _, body) = get(&st, &path, false).await;
    up.set_failure(Failure::Down);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, h, stale) = get(&st, &path, false).await;
    assert_eq!(status, 200);
    assert_eq!(hv(&h, "x-stowage-cache"), Some("stale"));
    assert_eq!(stale, body);
    // Offline after a restart: from disk.
    let dir = st.stop().await;
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"1s\"").await;
    let (status, h, stale) = get(&st, &path, false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&stale));
    assert_eq!(hv(&h, "x-stowage-cache"), Some("stale"));
    assert_eq!(hv(&h, "content-type"), Some(OCI_INDEX));
    let mut want = vec![sig.digest.clone(), sbom.digest.clone()];
    want.sort();
    assert_eq!(listed(&stale), want);
    // The signature itself verifies offline too, once fetched.
    up.set_failure(Failure::None);
    check_manifest(
        &client(),
        &st,
        "team/app",
        &sig.digest,
        &sig.manifest,
        OCI_MANIFEST,
    )
    .await;
    up.set_failure(Failure::Down);
    check_manifest(
        &client(),
        &st,
        "team/app",
        &sig.digest,
        &sig.manifest,
        OCI_MANIFEST,
    )
    .await;
    // Nothing cached for another subject: the outage is the answer.
    let other = format!("team/app/referrers/{}", sig.digest);
    let (status, _, _) = get(&st, &other, false).await;
    assert_eq!(status, 503);
}

/// An upstream without the referrers API (404) is answered 404, so clients
/// fall back to the tag schema; the `sha256-<hex>.sig` tag cosign writes is
/// a tag like any other: cached, revalidated after the TTL, served stale.
#[tokio::test]
async fn tag_schema_fallback_goes_through_the_tag_cache() {
    let (up, img, sig, _) = signed().await;
    let sig_tag = format!("sha256-{}.sig", &img.digest["sha256:".len()..]);
    up.set_tag("team/app", &sig_tag, &sig.digest);
    up.respond_open(
        &format!("/v2/team/app/referrers/{}", img.digest),
        404,
        &[("content-type", "text/plain")],
        "404 page not found\n",
    );
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let (status, _, _) = get(&st, &format!("team/app/referrers/{}", img.digest), false).await;
    assert_eq!(status, 404);
    let c = client();
    check_manifest(&c, &st, "team/app", &sig_tag, &sig.manifest, OCI_MANIFEST).await;
    let gets = up.manifest_gets("team/app", &sig_tag);
    check_manifest(&c, &st, "team/app", &sig_tag, &sig.manifest, OCI_MANIFEST).await;
    assert_eq!(
        up.manifest_gets("team/app", &sig_tag),
        gets,
        "within the TTL"
    );
    up.set_failure(Failure::Down);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = c
        .get(st.manifest_url("team/app", &sig_tag))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-stowage-cache").as_deref(), Some("stale"));
    assert_eq!(r.bytes().await.unwrap(), sig.manifest);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Referrers answers are cached per `artifactType` filter, which is the
/// client's text: many distinct long filters on a subject with a large
/// answer must not grow the mirror's memory without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_answers_for_many_filters_stay_within_a_memory_budget() {
    let up = FakeUpstream::start().await;
    let subject = sha256_digest(b"subject");
    // A 256 KiB answer, whatever the filter (upstream applies none).
    let pad = "x".repeat(256 * 1024);
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[],"annotations":{{"pad":"{pad}"}}}}"#
    );
    up.respond(
        &format!("/v2/team/app/referrers/{subject}"),
        200,
        &[("content-type", OCI_INDEX)],
        &body,
    );
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        config_toml(&dir.path().join("cache"), &up.url(), ""),
    )
    .unwrap();
    let mut p = Process::with_config(&config, &[]);
    let addr = p.listening_addr();
    let c = client();
    let ask = |i: usize| {
        let filter = format!("application/vnd.example.{i}.{}", "y".repeat(16 * 1024));
        c.get(format!("http://{addr}/v2/team/app/referrers/{subject}"))
            .query(&[("artifactType", filter)])
            .send()
    };
    for i in 0..20 {
        assert_eq!(ask(i).await.unwrap().status(), 200);
    }
    let before = rss_kib(p.pid());
    for i in 20..1020 {
        let r = ask(i).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), body.len());
    }
    let grown = rss_kib(p.pid()).saturating_sub(before);
    // 1000 answers of 272 KiB would be about 270 MiB.
    assert!(grown < 96 * 1024, "RSS grew by {grown} KiB");
}

/// The `_referrers` record files under the cache's `tags/`.
fn referrers_records(cache: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path, inside: bool) -> usize {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), inside || e.file_name() == "_referrers")
                } else {
                    usize::from(inside)
                }
            })
            .sum()
    }
    walk(&cache.join("tags"), false)
}

/// Empty referrers lists for digests or filters clients make up leave no
/// file behind (an OCI 1.1 registry answers 200 to any subject: each was
/// a record file for good, outside any budget). Lists with referrers, and
/// the unfiltered list of a manifest the cache holds, are still kept for
/// outages.
#[tokio::test]
async fn empty_referrers_of_unknown_subjects_are_not_kept_on_disk() {
    let (up, img, _sig, _sbom) = signed().await;
    let plain = make_image(Format::Oci, &[101]);
    up.push_image("team/app", "plain", &plain);
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    for i in 0..20u8 {
        let subject = sha256_digest(&[i]);
        let (status, _, body) = get(&st, &format!("team/app/referrers/{subject}"), false).await;
        assert_eq!(status, 200);
        assert!(listed(&body).is_empty());
        let filtered = format!("team/app/referrers/{}?artifactType=x/y{i}", img.digest);
        let (status, _, body) = get(&st, &filtered, false).await;
        assert_eq!(status, 200);
        assert!(listed(&body).is_empty());
    }
    assert_eq!(referrers_records(st.dir.path()), 0);

    // Kept: a list with referrers, and the empty list of a pulled image.
    let (status, _, _) = get(&st, &format!("team/app/referrers/{}", img.digest), false).await;
    assert_eq!(status, 200);
    check_manifest(
        &client(),
        &st,
        "team/app",
        "plain",
        &plain.manifest,
        OCI_MANIFEST,
    )
    .await;
    let file = stowage::test_hooks::manifest_path(st.dir.path(), &plain.digest);
    within(10, "the manifest is on disk", async {
        while !file.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let path = format!("team/app/referrers/{}", plain.digest);
    let (status, _, body) = get(&st, &path, false).await;
    assert_eq!(status, 200);
    assert!(listed(&body).is_empty());
    assert_eq!(referrers_records(st.dir.path()), 2);
    // ... and served after a restart with upstream down.
    let dir = st.stop().await;
    up.set_failure(Failure::Down);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"1s\"").await;
    let (status, h, stale) = get(&st, &path, false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&stale));
    assert_eq!(hv(&h, "x-stowage-cache"), Some("stale"));
    assert!(listed(&stale).is_empty());
}

/// Referrers deleted upstream are not brought back by an outage: the
/// record of the earlier answer goes when the new (empty, so not kept)
/// answer replaces it.
#[tokio::test]
async fn referrers_deleted_upstream_are_not_served_stale() {
    let (up, img, sig, sbom) = signed().await;
    let st = start_stowage(&up.url(), "tag_ttl = \"1s\"").await;
    let path = format!("team/app/referrers/{}", img.digest);
    let (_, _, body) = get(&st, &path, false).await;
    assert_eq!(listed(&body).len(), 2);
    up.remove_manifest(&sig.digest);
    up.remove_manifest(&sbom.digest);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, body) = get(&st, &path, false).await;
    assert_eq!(status, 200);
    assert!(listed(&body).is_empty());
    // Upstream out, after a restart: nothing kept, not the old list.
    let dir = st.stop().await;
    up.set_failure(Failure::Down);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"1s\"").await;
    let (status, _, body) = get(&st, &path, false).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
}
