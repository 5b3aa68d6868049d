//! Client-side fault injection (issue 11, "Prove it"): clients that
//! disconnect in the middle of a fill, clients that never read their
//! response, and a thousand connections that never send a byte. For each:
//! nothing waits past the configured timeouts, the cache ends up right,
//! and afterwards the process's open file descriptors, live tokio tasks
//! and resident memory are back to their baseline within a stated margin.
//!
//! The mirror runs in-process, so `/proc/self` is the server's (plus the
//! test's own sockets, which each test closes before it compares) and the
//! runtime's task count includes the server's connection tasks. The tests
//! take turns (`SERIAL`), since descriptors and memory are per process.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt as _;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Margins of the leak checks: a few descriptors and tasks (the upstream
/// client's pooled connections come and go), and resident memory (the
/// allocator keeps some freed memory; what matters is that it does not grow
/// with the number of clients).
const FD_MARGIN: usize = 8;
const TASK_MARGIN: usize = 8;
const RSS_MARGIN: u64 = 32 << 20;

/// Timeouts the tests run with.
const LIMITS: &str = "\n[limits]\nheader_read_timeout = \"2s\"\nidle_timeout = \"2s\"\n";

/// The checks read process-wide figures: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits (up to `secs`) until usage is back within the margins of
/// `base`; fails showing both.
async fn back_to_baseline(base: Usage, secs: u64, what: &str) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = usage();
        let ok = now.fds <= base.fds + FD_MARGIN
            && now.tasks <= base.tasks + TASK_MARGIN
            && now.rss <= base.rss + RSS_MARGIN;
        if ok {
            eprintln!("{what}: baseline {base:?}, after {now:?}");
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not back to baseline after {secs} s: baseline {base:?}, now {now:?} \
             (margins: {FD_MARGIN} fds, {TASK_MARGIN} tasks, {} MiB)",
            RSS_MARGIN >> 20
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start(up: &FakeUpstream) -> Stowage {
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "") + LIMITS;
    start_stowage_toml(dir, &toml).await
}

/// Eight clients start reading a blob that is still being fetched and hang
/// up after their first bytes. The fill carries on alone, the blob is
/// cached and verified (one upstream GET), and nothing of the eight
/// requests is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_mid_fill_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start(&up).await;
    // Warm-up: the server's first request, the upstream pool, lazy statics.
    let (_, body) = get_ok(&client(), &st.v2("")).await;
    assert_eq!(&body[..], b"{}");
    let data = random_bytes(8 * 1024 * 1024);
    let digest = up.add_blob(data.clone());
    let hold = up.hold(&digest);
    let base = usage();

    let url = st.blob_url("library/big", &digest);
    let mut readers = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        readers.push(tokio::spawn(async move {
            let c = client();
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let mut s = r.bytes_stream();
            let first = within(10, "first bytes of the fill", s.next()).await;
            assert!(matches!(first, Some(Ok(b)) if !b.is_empty()));
            // Hang up: the stream, the response and the client go.
        }));
    }
    hold.wait_half_sent(1).await;
    for r in readers {
        within(20, "reader", r).await.unwrap();
    }
    hold.release();
    within(20, "the fill to commit", async {
        while st.hooks.fills_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (_, body) = get_ok(&client(), &url).await;
    assert_eq!(sha256_digest(&body), digest, "the blob was cached whole");
    assert_eq!(up.blob_gets(&digest), 1, "one upstream GET");
    drop(body);
    back_to_baseline(base, 10, "disconnect mid-fill").await;
}

/// Starts stowage with prefetch off and at most `max` fills going on with
/// no client reading them.
async fn start_detached(up: &FakeUpstream, max: usize) -> Stowage {
    let dir = TempDir::new().unwrap();
    let toml = format!(
        "prefetch = false\n{}{LIMITS}\n[cache]\nmax_detached_fills = {max}\n",
        config_toml(dir.path(), &up.url(), "")
    );
    start_stowage_toml(dir, &toml).await
}

/// GETs `url`, reads the first bytes and hangs up.
async fn read_a_little_and_hang_up(url: &str) {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let first = within(10, "first bytes of the fill", s.next()).await;
    assert!(matches!(first, Some(Ok(b)) if !b.is_empty()));
}

/// The only client of a fill of `digest` (held upstream by `hold`) hangs
/// up; once the server has seen it, the hold is released, and the fill
/// must be stopped (the first fill counted abandoned).
async fn hang_up_alone_until_stopped(st: &Stowage, digest: &str, hold: &Hold) {
    read_a_little_and_hang_up(&st.blob_url("library/big", digest)).await;
    no_fill_readers(st).await;
    hold.release();
    metric_becomes(
        st,
        "stowage_blob_fills_total",
        &[("result", "abandoned")],
        1.0,
    )
    .await;
}

/// Waits until no request reads a running fill (the server has seen every
/// client hang up).
async fn no_fill_readers(st: &Stowage) {
    within(10, "the server to see the clients leave", async {
        while st.hooks.fill_readers() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A client asks for three blobs still being fetched and hangs up on each
/// after the first bytes. With `cache.max_detached_fills = 1` one fill goes
/// on alone and is cached; the two others are stopped at their next chunk:
/// their upstream bodies are dropped, nothing of them is kept, and a later
/// request fetches them again. Before the limit, all three went on (so a
/// client hanging up on blob after blob made the mirror download every one
/// at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_nobody_reads_past_the_limit_are_stopped() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start_detached(&up, 1).await;
    let blobs: Vec<_> = (0..3).map(|_| random_bytes(8 * 1024 * 1024)).collect();
    let digests: Vec<_> = blobs.iter().map(|b| up.add_blob(b.clone())).collect();
    let holds: Vec<_> = digests.iter().map(|d| up.hold(d)).collect();
    // (Not waiting for upstream to send the held halves: a fill may be
    // stopped, and its upstream connection closed, before its half is.)
    for d in &digests {
        read_a_little_and_hang_up(&st.blob_url("library/big", d)).await;
    }
    no_fill_readers(&st).await;
    for hold in &holds {
        hold.release();
    }
    within(20, "the fills to end", async {
        while st.hooks.fills_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    metric_becomes(
        &st,
        "stowage_blob_fills_total",
        &[("result", "abandoned")],
        2.0,
    )
    .await;
    metric_becomes(&st, "stowage_blob_fills_total", &[("result", "ok")], 1.0).await;
    assert_eq!(
        (st.hooks.used(), st.hooks.reserved()),
        (8 * 1024 * 1024, 0),
        "only the one that went on is kept"
    );
    assert_eq!(
        std::fs::read_dir(stowage::test_hooks::tmp_dir(st.dir.path()))
            .unwrap()
            .count(),
        0,
        "no temporary file left"
    );
    // Each is served whole afterwards: the kept one from the cache, the
    // stopped ones fetched again.
    let mut hits = 0;
    for (i, (d, data)) in digests.iter().zip(&blobs).enumerate() {
        let (h, body) = get_ok(&client(), &st.blob_url("library/big", d)).await;
        assert!(body == *data, "bytes of blob {i}");
        let hit = h.get("x-stowage-cache").is_some_and(|v| v == "hit");
        hits += usize::from(hit);
        let want = if hit { 1 } else { 2 };
        assert_eq!(up.blob_gets(d), want, "upstream GETs of blob {i}");
    }
    assert_eq!(hits, 1, "one blob was kept");
}

/// With `cache.max_detached_fills = 0`, a fill goes on as long as one of
/// its clients still reads it (another hanging up changes nothing), and is
/// stopped once its last client hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_goes_on_while_any_client_reads_it() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start_detached(&up, 0).await;
    let data = random_bytes(8 * 1024 * 1024);
    let digest = up.add_blob(data.clone());
    let hold = up.hold(&digest);
    let url = st.blob_url("library/big", &digest);
    let stays = client().get(&url).send().await.unwrap();
    assert_eq!(stays.status(), 200);
    read_a_little_and_hang_up(&url).await;
    hold.wait_half_sent(1).await;
    within(10, "the server to see one client leave", async {
        while st.hooks.fill_readers() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    hold.release();
    let body = within(20, "the staying client's body", stays.bytes())
        .await
        .unwrap();
    assert!(body == data, "the client that stayed got the whole blob");
    metric_becomes(&st, "stowage_blob_fills_total", &[("result", "ok")], 1.0).await;

    // Alone, a client that hangs up takes its fill with it.
    let other = random_bytes(8 * 1024 * 1024);
    let od = up.add_blob(other.clone());
    let ohold = up.hold(&od);
    hang_up_alone_until_stopped(&st, &od, &ohold).await;
    let (_, body) = get_ok(&client(), &st.blob_url("library/big", &od)).await;
    assert!(body == other);
    assert_eq!(up.blob_gets(&od), 2, "fetched again");
}

/// A fill that is not being cached (a blob over `cache.max_blob_size`,
/// streamed off the disk) stops as soon as its last client hangs up, even
/// with a permit free: nothing of it would be kept. It used to go on until
/// its next chunk found nobody to hand it to, and counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncached_fill_stops_when_its_last_client_leaves() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let dir = TempDir::new().unwrap();
    let toml = format!(
        "prefetch = false\n{}{LIMITS}\n[cache]\nmax_blob_size = \"1MiB\"\n",
        config_toml(dir.path(), &up.url(), "")
    );
    let st = start_stowage_toml(dir, &toml).await;
    let data = random_bytes(8 * 1024 * 1024);
    let digest = up.add_blob(data.clone());
    let hold = up.hold(&digest);
    hang_up_alone_until_stopped(&st, &digest, &hold).await;
    assert_eq!(
        metric(&st, "stowage_blob_fills_total", &[("result", "failed")]).await,
        0.0
    );
    let (_, body) = get_ok(&client(), &st.blob_url("library/big", &digest)).await;
    assert!(body == data, "served whole afterwards");
}

/// Reads what is there until EOF or an error; the byte count.
async fn drain(tcp: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k as u64,
        }
    }
}

/// Twenty HTTP/1 clients and five h2 streams ask for a cached 32 MiB blob
/// and never read. The server cuts each after the idle timeout (2 s): a
/// client that then reads gets less than the blob and an end, not the rest.
/// Meanwhile a normal client is served, and afterwards nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_cut_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start(&up).await;
    let size = 32 * 1024 * 1024;
    let digest = up.add_blob(random_bytes(size));
    let path = format!("/v2/library/big/blobs/{digest}");
    let (_, body) = get_ok(&client(), &st.blob_url("library/big", &digest)).await;
    assert_eq!(body.len(), size);
    drop(body);
    let base = usage();

    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(st.addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        stalled.push(tcp);
    }
    let mut h2_bodies = Vec::new();
    for _ in 0..5 {
        let tcp = TcpStream::connect(st.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(format!("http://{}{path}", st.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // The body is never polled: the stream's window closes at 64 KiB.
        h2_bodies.push((send, resp, conn));
    }

    // A normal client is served all the while.
    let (_, body) = get_ok(&client(), &st.blob_url("library/big", &digest)).await;
    assert_eq!(sha256_digest(&body), digest);
    drop(body);

    // After the idle timeout each stalled HTTP/1 response was cut short.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for mut tcp in stalled {
        let got = within(10, "drain a cut connection", drain(&mut tcp)).await;
        assert!(
            got < size as u64,
            "a client that never read got the whole {got} bytes: not cut after the idle timeout"
        );
    }
    let cut_after = started.elapsed();
    for (_, _, conn) in &h2_bodies {
        assert!(
            conn.is_finished(),
            "an h2 connection with an unread stream is still open after {cut_after:?}"
        );
    }
    drop(h2_bodies);
    back_to_baseline(base, 10, "never-reading clients").await;
}

/// A thousand connections that never send a byte: a normal request is
/// served meanwhile, all are closed after the first-byte timeout (2 s),
/// and then nothing of them is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_are_closed_after_the_timeout() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start(&up).await;
    let (_, body) = get_ok(&client(), &st.v2("")).await;
    assert_eq!(&body[..], b"{}");
    let base = usage();

    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(st.addr).await.unwrap());
    }
    let t = Instant::now();
    let (_, body) = get_ok(&client(), &st.v2("")).await;
    assert_eq!(&body[..], b"{}");
    let normal = t.elapsed();
    assert!(
        normal < Duration::from_secs(2),
        "a normal request took {normal:?} next to 1,000 idle connections"
    );
    let closed = within(15, "the idle connections to be closed", async {
        let mut waits = Vec::new();
        for mut tcp in idle {
            waits.push(tokio::spawn(async move {
                let mut b = [0u8; 16];
                let _ = tcp.read(&mut b).await;
                started.elapsed()
            }));
        }
        let mut last = Duration::ZERO;
        for w in waits {
            last = last.max(w.await.unwrap());
        }
        last
    })
    .await;
    eprintln!("1,000 idle connections: the last closed {closed:?} after the first was opened");
    assert!(
        closed < Duration::from_secs(6),
        "idle connections closed only after {closed:?} (first-byte timeout 2 s)"
    );
    back_to_baseline(base, 10, "1,000 idle connections").await;
}

/// Reads a response's status line (or what came before the connection
/// ended): the bytes up to the first CRLF.
async fn status_line(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match tcp.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
    let end = got
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(got.len());
    String::from_utf8_lossy(&got[..end]).into_owned()
}

/// HTTP/1 request heads are bounded (64 KiB): two hundred clients that
/// each send 300 KiB of a head that never ends are answered 431 and
/// closed at once, instead of each holding a buffer that size until the
/// header timeout (hyper's default allowed about 400 KiB). A 48 KiB head
/// (a large bearer token) is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused_without_holding_memory() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::start().await;
    let st = start(&up).await;
    let mut tcp = TcpStream::connect(st.addr).await.unwrap();
    let pad = "a".repeat(48 * 1024);
    tcp.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let line = within(5, "a 48 KiB head answered", status_line(&mut tcp)).await;
    assert_eq!(line, "HTTP/1.1 200 OK", "a 48 KiB request head");
    drop(tcp);
    let base = usage();

    let head = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(300 * 1024)
    );
    let mut sent = Vec::new();
    for _ in 0..200 {
        let mut tcp = TcpStream::connect(st.addr).await.unwrap();
        let head = head.clone();
        sent.push(tokio::spawn(async move {
            // The server may stop reading (and close) before all is sent.
            let _ = tcp.write_all(head.as_bytes()).await;
            tcp
        }));
    }
    let mut held = Vec::new();
    for s in sent {
        held.push(within(10, "a head sent", s).await.unwrap());
    }
    // The header timeout (2 s) has not passed: what the server holds now
    // is what the heads cost it.
    let now = usage();
    assert!(
        now.rss <= base.rss + RSS_MARGIN,
        "200 unfinished 300 KiB heads grew resident memory from {} to {} MiB",
        base.rss >> 20,
        now.rss >> 20
    );
    let mut refused = 0;
    for mut tcp in held {
        let line = within(5, "an oversized head answered", status_line(&mut tcp)).await;
        if line == "HTTP/1.1 431 Request Header Fields Too Large" {
            refused += 1;
        } else {
            eprintln!("an oversized head got {line:?}");
        }
    }
    // The server closes with the rest of a head unread, which resets the
    // connection; a reset may reach a client before it read the answer.
    assert!(
        refused >= 190,
        "{refused} of 200 oversized heads answered 431"
    );
    back_to_baseline(base, 10, "oversized request heads").await;
}
