//! Soak (issue 11, "Prove it"): mixed load on loopback against an
//! in-process stowage and fake upstream, with upstream faults injected
//! every few seconds, for `STOWAGE_SOAK_SECS` seconds (default 60).
//!
//! The load: hits (a hot set of blobs), ranges of them, misses (a fresh
//! blob each time), joins (four clients asking for a fresh blob at once),
//! manifests by digest and by tag (a 1 s tag TTL, tags moved every few
//! seconds). The faults, one every 3 s in turn: the next fresh blobs reset,
//! stall, lie about their length or their digest; a burst of 503s; a 429;
//! the next tag target stalls (it must be served stale); upstream down for
//! a second.
//!
//! It fails if a response completes with bytes that do not match (a blob's
//! digest, a range of it, a manifest's `Docker-Content-Digest` and the
//! digests its tag ever pointed at), if a request hangs past 15 s, if a
//! kind of request never succeeds, or if afterwards descriptors or tasks are
//! more than 16 above the baseline, or RSS more than 64 MiB above it. It
//! prints a table: requests by kind and outcome, p50/p99 latency, and the
//! process's descriptors, tasks and RSS before and after.
//!
//! Ignored by default (it takes a minute); `.ci/run` runs it as a step of
//! its own: `cargo test --test soak -- --ignored --nocapture`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;
const HANG: Duration = Duration::from_secs(15);
const CLIENTS: usize = 12;

/// A cheap, thread-safe pseudo-random source.
fn rand_below(n: usize) -> usize {
    static STATE: AtomicUsize = AtomicUsize::new(0x9e37_79b9);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % n.max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Hit,
    Range,
    Miss,
    Join,
    ManifestDigest,
    ManifestTag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Outcome {
    /// Complete and verified.
    Ok,
    /// An OCI error status (upstream faults reach clients this way).
    Status(u16),
    /// The body was cut (a fault mid-body: the client must retry).
    Cut,
    /// Complete but wrong: must never happen.
    Corrupt,
}

/// What the next fresh blob suffers.
#[derive(Debug, Clone, Copy)]
enum BlobFault {
    Body(BodyFault),
    WrongDigest,
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<(Kind, Outcome), usize>,
    latencies: HashMap<Kind, Vec<Duration>>,
    stale: usize,
}

struct Shared {
    st: Stowage,
    up: FakeUpstream,
    hot: Vec<Blob>,
    images: Vec<Image>,
    /// The digests each tag (by image index) ever pointed at.
    tag_history: Mutex<HashMap<usize, HashSet<String>>>,
    /// The fault the next fresh blob gets.
    next_blob_fault: Mutex<Option<BlobFault>>,
    /// Whether the next tag move's target manifest stalls.
    stall_next_tag: AtomicBool,
    tally: Mutex<Tally>,
    stop: AtomicBool,
}

impl Shared {
    fn record(&self, kind: Kind, outcome: Outcome, took: Duration) {
        assert!(took < HANG, "{kind:?} took {took:?}: hung");
        let mut t = self.tally.lock().unwrap();
        *t.outcomes.entry((kind, outcome)).or_default() += 1;
        t.latencies.entry(kind).or_default().push(took);
    }

    /// A fresh blob on the upstream, with the pending fault if any.
    fn fresh(&self, size: usize) -> Blob {
        let b = Blob::random(size);
        self.up.add_blob(b.data.clone());
        match self.next_blob_fault.lock().unwrap().take() {
            Some(BlobFault::Body(f)) => self.up.fault(&b.digest, f),
            Some(BlobFault::WrongDigest) => self.up.corrupt(&b.digest),
            None => {}
        }
        b
    }

    fn forget(&self, b: &Blob) {
        self.up.clear_fault(&b.digest);
        self.up.uncorrupt(&b.digest);
        self.up.remove_blob(&b.digest);
    }
}

/// GETs `url` (with `range`), returning the status, headers and body, or
/// `None` for the body when the transfer broke.
async fn get(
    url: &str,
    range: Option<String>,
) -> Option<(u16, reqwest::header::HeaderMap, Option<bytes::Bytes>)> {
    let c = client();
    let mut req = c.get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let r = tokio::time::timeout(HANG, async {
        let r = req.send().await.ok()?;
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        Some((status, headers, r.bytes().await.ok()))
    })
    .await;
    r.unwrap_or_else(|_| panic!("GET {url} hung past {HANG:?}"))
}

fn classify(
    got: Option<(u16, reqwest::header::HeaderMap, Option<bytes::Bytes>)>,
    ok: impl FnOnce(&reqwest::header::HeaderMap, &[u8]) -> bool,
) -> Outcome {
    match got {
        None => Outcome::Cut,
        Some((status, _, None)) if status < 300 => Outcome::Cut,
        Some((status, _, _)) if status >= 300 => Outcome::Status(status),
        Some((_, headers, Some(body))) => {
            if ok(&headers, &body) {
                Outcome::Ok
            } else {
                Outcome::Corrupt
            }
        }
        Some((status, _, None)) => Outcome::Status(status),
    }
}

async fn one_op(s: &Arc<Shared>) {
    let pick = rand_below(100);
    let started = Instant::now();
    match pick {
        0..30 => {
            let b = &s.hot[rand_below(s.hot.len())];
            let got = get(&s.st.blob_url("library/hot", &b.digest), None).await;
            let o = classify(got, |_, body| body == &b.data[..]);
            s.record(Kind::Hit, o, started.elapsed());
        }
        30..45 => {
            let b = &s.hot[rand_below(s.hot.len())];
            let start = rand_below(b.len() - 1);
            let end = (start + 1 + rand_below(64 * KIB)).min(b.len() - 1);
            let got = get(
                &s.st.blob_url("library/hot", &b.digest),
                Some(format!("bytes={start}-{end}")),
            )
            .await;
            let o = classify(got, |_, body| body == &b.data[start..=end]);
            s.record(Kind::Range, o, started.elapsed());
        }
        45..60 => {
            let b = s.fresh(16 * KIB + rand_below(MIB));
            let got = get(&s.st.blob_url("library/fresh", &b.digest), None).await;
            let o = classify(got, |_, body| body == &b.data[..]);
            s.record(Kind::Miss, o, started.elapsed());
            s.forget(&b);
        }
        60..68 => {
            let b = s.fresh(MIB + rand_below(MIB));
            let url = s.st.blob_url("library/fresh", &b.digest);
            let gets: Vec<_> = (0..4)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move { get(&url, None).await })
                })
                .collect();
            for g in gets {
                let got = g.await.unwrap();
                let o = classify(got, |_, body| body == &b.data[..]);
                s.record(Kind::Join, o, started.elapsed());
            }
            s.forget(&b);
        }
        68..80 => {
            let img = &s.images[rand_below(s.images.len())];
            let got = get(&s.st.manifest_url("library/app", &img.digest), None).await;
            let o = classify(got, |_, body| body == &img.manifest[..]);
            s.record(Kind::ManifestDigest, o, started.elapsed());
        }
        _ => {
            let i = rand_below(4);
            let got = get(&s.st.manifest_url("library/app", &format!("t{i}")), None).await;
            let stale = got
                .as_ref()
                .and_then(|(_, h, _)| h.get("x-stowage-cache"))
                .is_some_and(|v| v == "stale");
            let history = s
                .tag_history
                .lock()
                .unwrap()
                .get(&i)
                .cloned()
                .unwrap_or_default();
            let o = classify(got, |h, body| {
                let said = h
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                sha256_digest(body) == said && history.contains(said)
            });
            s.record(Kind::ManifestTag, o, started.elapsed());
            if stale {
                s.tally.lock().unwrap().stale += 1;
            }
        }
    }
}

/// Moves a tag every 2 s; injects one fault every 3 s, in turn.
async fn chaos(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut n = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(4) {
            let i = rand_below(4);
            let target = rand_below(s.images.len());
            let img = &s.images[target];
            if s.stall_next_tag.swap(false, Ordering::Relaxed) {
                s.up.fault(&img.digest, BodyFault::StallMidBody);
            } else {
                s.up.clear_fault(&img.digest);
            }
            // Known before any client can see it.
            s.tag_history
                .lock()
                .unwrap()
                .entry(i)
                .or_default()
                .insert(img.digest.clone());
            s.up.set_tag("library/app", &format!("t{i}"), &img.digest);
        }
        if n.is_multiple_of(6) {
            let faults = [
                BlobFault::Body(BodyFault::ResetMidBody),
                BlobFault::Body(BodyFault::StallAfterHead),
                BlobFault::Body(BodyFault::StallMidBody),
                BlobFault::Body(BodyFault::LongerThanLength(100)),
                BlobFault::Body(BodyFault::ShorterThanLength(100)),
                BlobFault::WrongDigest,
            ];
            match (n / 6) % 9 {
                k @ 0..6 => *s.next_blob_fault.lock().unwrap() = Some(faults[k as usize]),
                6 => s.up.fail_next(&[503, 503, 503, 503]),
                7 => {
                    s.up.fail_next(&[429]);
                    s.stall_next_tag.store(true, Ordering::Relaxed);
                }
                _ => {
                    s.up.set_failure(Failure::Down);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    s.up.set_failure(Failure::None);
                }
            }
        }
    }
    s.up.set_failure(Failure::None);
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a minute or more; .ci/run runs it as its own step"]
async fn soak_mixed_load_with_upstream_faults() {
    let secs: u64 = std::env::var("STOWAGE_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let up = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new().unwrap();
    let toml = format!(
        "{}timeout = \"1s\"\ntag_ttl = \"1s\"\n[cache]\nmax_size = \"48MiB\"\n",
        config_toml(dir.path(), &up.url(), "")
    );
    // config_toml ends inside [[upstream]]; [cache] after it is its own table.
    let st = start_stowage_toml(dir, &toml).await;
    let hot: Vec<Blob> = (0..24)
        .map(|i| Blob::random(32 * KIB + i * 20 * KIB))
        .collect();
    for b in &hot {
        up.add_blob(b.data.clone());
    }
    let images: Vec<Image> = (0..8)
        .map(|i| make_image(Format::Oci, &[100 + i]))
        .collect();
    let mut history = HashMap::new();
    for img in &images {
        up.push_image_untagged("library/app", img);
    }
    for (i, img) in images.iter().take(4).enumerate() {
        up.set_tag("library/app", &format!("t{i}"), &img.digest);
        history.insert(i, HashSet::from([img.digest.clone()]));
    }
    let shared = Arc::new(Shared {
        st,
        up,
        hot,
        images,
        tag_history: Mutex::new(history),
        next_blob_fault: Mutex::new(None),
        stall_next_tag: AtomicBool::new(false),
        tally: Mutex::new(Tally::default()),
        stop: AtomicBool::new(false),
    });
    // Warm up: every hot blob and manifest once; then the baseline.
    for _ in 0..40 {
        one_op(&shared).await;
    }
    for b in &shared.hot {
        let _ = get(&shared.st.blob_url("library/hot", &b.digest), None).await;
    }
    *shared.tally.lock().unwrap() = Tally::default();
    // The fake's request log would grow with every request, and it shares
    // this process: off, so the memory measured is stowage's.
    shared.up.forget_requests();
    let before = usage();
    // RSS over time, to tell a leak (steady growth) from the allocator
    // settling (a step, then flat).
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (samples, shared) = (samples.clone(), shared.clone());
        tokio::spawn(async move {
            let every = Duration::from_secs((secs / 10).max(1));
            while !shared.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(every).await;
                samples.lock().unwrap().push(usage().rss);
            }
        })
    };

    let started = Instant::now();
    let chaos = tokio::spawn(chaos(shared.clone()));
    let deadline = started + Duration::from_secs(secs);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let s = shared.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    one_op(&s).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    shared.stop.store(true, Ordering::Relaxed);
    chaos.await.unwrap();
    sampler.await.unwrap();
    let ran = started.elapsed();
    shared.up.clear_faults();

    // Settle, then the leak checks.
    within(30, "fills and upstream bodies end", async {
        while shared.st.hooks.fills_in_flight() > 0 || shared.up.bodies_open() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let settle = Instant::now();
    let after = loop {
        let now = usage();
        if (now.fds <= before.fds + 16 && now.tasks <= before.tasks + 16)
            || settle.elapsed() > Duration::from_secs(30)
        {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let tally = shared.tally.lock().unwrap();
    let mut table = String::new();
    table.push_str(&format!(
        "soak: {:.0} s, {CLIENTS} clients, a fault every 3 s, upstream timeout 1 s, tag TTL 1 s, budget 48 MiB\n",
        ran.as_secs_f64()
    ));
    table.push_str(&format!(
        "{:<16}{:>9}{:>9}{:>9}{:>7}{:>9}{:>9}{:>9}  other statuses\n",
        "request", "total", "ok", "5xx/429", "cut", "corrupt", "p50 ms", "p99 ms"
    ));
    let kinds = [
        Kind::Hit,
        Kind::Range,
        Kind::Miss,
        Kind::Join,
        Kind::ManifestDigest,
        Kind::ManifestTag,
    ];
    let (mut total, mut corrupt_total) = (0, 0);
    for kind in kinds {
        let count = |f: &dyn Fn(&Outcome) -> bool| -> usize {
            tally
                .outcomes
                .iter()
                .filter(|((k, o), _)| *k == kind && f(o))
                .map(|(_, n)| n)
                .sum()
        };
        let all = count(&|_| true);
        let ok = count(&|o| *o == Outcome::Ok);
        let server = count(&|o| matches!(o, Outcome::Status(s) if *s >= 500 || *s == 429));
        let cut = count(&|o| *o == Outcome::Cut);
        let corrupt = count(&|o| *o == Outcome::Corrupt);
        let other: Vec<String> = tally
            .outcomes
            .iter()
            .filter(|((k, o), _)| {
                *k == kind && matches!(o, Outcome::Status(s) if *s < 500 && *s != 429)
            })
            .map(|((_, o), n)| format!("{o:?}x{n}"))
            .collect();
        let mut lat = tally.latencies.get(&kind).cloned().unwrap_or_default();
        lat.sort();
        table.push_str(&format!(
            "{:<16}{:>9}{:>9}{:>9}{:>7}{:>9}{:>9.1}{:>9.1}  {}\n",
            format!("{kind:?}"),
            all,
            ok,
            server,
            cut,
            corrupt,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            other.join(" ")
        ));
        total += all;
        corrupt_total += corrupt;
        assert!(ok > 0, "no {kind:?} request succeeded");
    }
    table.push_str(&format!(
        "total {total} requests ({:.0}/s), {} tags served stale\n",
        total as f64 / ran.as_secs_f64(),
        tally.stale
    ));
    table.push_str(&format!(
        "process     before    after\nfds       {:>8} {:>8}\ntasks     {:>8} {:>8}\nRSS MiB   {:>8.1} {:>8.1}\n",
        before.fds,
        after.fds,
        before.tasks,
        after.tasks,
        before.rss as f64 / MIB as f64,
        after.rss as f64 / MIB as f64
    ));
    let curve: Vec<String> = samples
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{:.0}", *r as f64 / MIB as f64))
        .collect();
    table.push_str(&format!(
        "RSS MiB every tenth of the run: {}\n",
        curve.join(" ")
    ));
    eprintln!("\n{table}");
    assert_eq!(corrupt_total, 0, "corrupt responses completed");
    assert!(
        after.fds <= before.fds + 16,
        "descriptors leaked: {before:?} -> {after:?}"
    );
    assert!(
        after.tasks <= before.tasks + 16,
        "tasks leaked: {before:?} -> {after:?}"
    );
    assert!(
        after.rss <= before.rss + 64 * MIB as u64,
        "RSS grew: {before:?} -> {after:?}"
    );
}
