//! Hostile HTTP/2 clients (issue 11, item 1): a flood of streams with a
//! zero flow-control window, kept alive with PINGs, must neither blow up
//! the process's memory nor keep connections open past the idle timeout,
//! and a normal client is still served meanwhile.
//!
//! The flood comes from `tests/tools/h2_flood.py` (Python's `h2`, installed
//! by `.ci/run` as Debian's `python3-h2`); stowage runs as the real binary
//! so its resident memory is its own (read from `/proc/<pid>/status`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

const MIB: u64 = 1024 * 1024;

/// The Python with `h2` (Debian's `python3-h2` is for /usr/bin/python3).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The flood's summary line.
#[derive(Debug, serde::Deserialize)]
struct Flood {
    accepted_streams: u64,
    headers: u64,
    closed_by_server: u64,
    closed_after: Vec<f64>,
    max_concurrent_streams: Option<u64>,
}

/// Runs the flood script to completion on a blocking thread.
async fn flood(
    addr: std::net::SocketAddr,
    path: &str,
    conns: u32,
    streams: u32,
    hold: f64,
    ping_every: f64,
) -> Flood {
    let args = vec![
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/h2_flood.py").to_string(),
        addr.ip().to_string(),
        addr.port().to_string(),
        path.to_string(),
        conns.to_string(),
        streams.to_string(),
        hold.to_string(),
        ping_every.to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(&args)
            .output()
            .expect("run tests/tools/h2_flood.py")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "h2_flood.py failed (is python3-h2 installed? .ci/run installs it): {stderr}"
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("h2_flood.py output {stdout:?}: {e}; stderr: {stderr}"))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// One GET over a fresh cleartext h2 connection (prior knowledge), the
/// whole body read.
async fn h2_get(addr: std::net::SocketAddr, path: &str) -> (u16, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// 20 connections x 100 streams with a zero window, asking for a cached
/// 48 MiB blob and kept alive with PINGs: the process stays under 64 MiB
/// resident (it reached 550 MiB when every stream held a 256 KiB read),
/// and a normal h2 client gets the whole blob meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_stream_flood_stays_within_64_mib() {
    let up = FakeUpstream::start().await;
    let data = random_bytes(48 * MIB as usize);
    let digest = up.add_blob(data.clone());
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(dir.path(), &up.url(), "");
    let mut st = Process::with_config(&config, &[]);
    let addr = st.listening_addr();
    let path = format!("/v2/library/big/blobs/{digest}");

    // Cache it (and check it) first.
    let (status, body) = within(60, "warm-up GET", h2_get(addr, &path)).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_digest(&body), digest);
    drop(body);
    let pid = st.pid();
    let before = status_kib(pid, "VmRSS");
    // Reset the peak so VmHWM measures the flood only.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();

    let started = Instant::now();
    let flood = tokio::spawn({
        let path = path.clone();
        async move { flood(addr, &path, 20, 100, 12.0, 1.0).await }
    });
    // Let the streams open, then serve a normal client in the middle of it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, body) = within(30, "a normal h2 GET during the flood", h2_get(addr, &path)).await;
    assert_eq!(status, 200, "normal request during the flood");
    assert_eq!(
        sha256_digest(&body),
        digest,
        "normal request during the flood"
    );
    let normal_took = started.elapsed();
    drop(body);
    let f = flood.await.unwrap();
    let peak = status_kib(pid, "VmHWM");
    let after = status_kib(pid, "VmRSS");
    eprintln!(
        "h2 flood: RSS before {} KiB, peak {} KiB, after {} KiB; {f:?}; normal GET done {:?} into the flood",
        before, peak, after, normal_took
    );
    assert!(st.is_running(), "stowage survived: {}", st.log().join("\n"));
    assert_eq!(
        f.max_concurrent_streams,
        Some(100),
        "the default stream limit is advertised: {f:?}"
    );
    assert!(
        f.accepted_streams >= 20 * 50,
        "the flood really opened its streams: {f:?}"
    );
    assert!(
        f.headers >= f.accepted_streams / 2,
        "the streams were answered (a response head each): {f:?}"
    );
    // Issue 11's goal is 64 MiB. This debug build peaks at about 48 MiB,
    // about 10 MiB over its size before the flood (38 MiB now that glibc
    // keeps freed memory; before that, 12-15 MiB over 33 MiB). The rise
    // was 27-29 MiB (peak 61-66 MiB) while every stream's handler state
    // was boxed as its HEADERS frame was read, before any handler ran, and
    // the whole flood took 580 MiB before the read budget.
    assert!(
        peak < 64 * 1024,
        "resident memory peaked at {peak} KiB during the flood (before: {before} KiB)"
    );
    assert!(
        peak.saturating_sub(before) < 24 * 1024,
        "the flood added {} KiB resident (before: {before} KiB, peak {peak} KiB)",
        peak.saturating_sub(before)
    );
}

/// PINGs are not activity: a connection whose streams cannot move (zero
/// window) is closed after the idle timeout even though the client pings
/// every half second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_do_not_keep_a_stalled_h2_connection_open() {
    let up = FakeUpstream::start().await;
    let digest = up.add_blob(random_bytes(2 * MIB as usize));
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(dir.path(), &up.url(), "[limits]\nidle_timeout = \"2s\"\n");
    let mut st = Process::with_config(&config, &[]);
    let addr = st.listening_addr();
    let path = format!("/v2/library/big/blobs/{digest}");
    let (status, _) = within(30, "warm-up GET", h2_get(addr, &path)).await;
    assert_eq!(status, 200);

    let f = flood(addr, &path, 4, 5, 12.0, 0.5).await;
    assert_eq!(f.accepted_streams, 20, "{f:?}");
    assert_eq!(f.headers, 20, "every stream got its response head: {f:?}");
    assert_eq!(
        f.closed_by_server, 4,
        "every pinging connection was closed: {f:?}"
    );
    for t in &f.closed_after {
        assert!(
            *t < 5.0,
            "closed {t} s after opening; idle timeout 2 s: {f:?}"
        );
    }
}

/// A request trickled in a byte at a time is not progress: a client that
/// sends the preface, then a HEADERS frame's payload one byte every half
/// second (well inside the idle timeout each time) is closed after the idle
/// timeout, not kept for as long as it trickles. So is one that trickles
/// the preface itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_h2_request_does_not_keep_the_connection_open() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let up = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(dir.path(), &up.url(), "[limits]\nidle_timeout = \"2s\"\n");
    let mut st = Process::with_config(&config, &[]);
    let addr = st.listening_addr();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // SETTINGS (empty), then the header of a HEADERS frame on stream 1
    // promising 40 bytes (20 s of trickling).
    let settings = [0u8, 0, 0, 0x4, 0, 0, 0, 0, 0];
    let headers = [0u8, 0, 40, 0x1, 0x4, 0, 0, 0, 1];
    for whole_preface in [true, false] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = tcp.into_split();
        let opened = Instant::now();
        let closed = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
            opened.elapsed()
        });
        let trickle: Vec<u8> = if whole_preface {
            wr.write_all(preface).await.unwrap();
            wr.write_all(&settings).await.unwrap();
            wr.write_all(&headers).await.unwrap();
            vec![0x82; 40]
        } else {
            preface.to_vec()
        };
        for b in trickle {
            if closed.is_finished() || wr.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let took = within(40, "the server to close the trickling connection", closed)
            .await
            .unwrap();
        assert!(
            took < Duration::from_secs(5),
            "closed after {took:?} (idle timeout 2 s), whole preface {whole_preface}"
        );
    }
}
