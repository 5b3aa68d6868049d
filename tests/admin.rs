//! The admin listener: `/healthz`, `/readyz` (cache directory writable,
//! listener up, draining at shutdown), switching it off, the request log
//! line in both log formats from the real binary, and the `[limits]` it
//! shares with the registry listener.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

async fn get(url: &str) -> (u16, String) {
    let r = within(10, url, client().get(url).send())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Polls `/readyz` until 200 (the server becomes ready once its accept
/// loop runs and the blob index is loaded); fails after 10 s.
async fn wait_ready(url: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(url).await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready after 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_and_not_found() {
    let up = FakeUpstream::start().await;
    let st = start_stowage(&up.url(), "").await;
    assert_ne!(st.admin, Some(st.addr));

    assert_eq!(get(&st.admin_url("/healthz")).await, (200, "ok\n".into()));
    wait_ready(&st.admin_url("/readyz")).await;
    assert_eq!(get(&st.admin_url("/readyz")).await, (200, "ready\n".into()));
    assert_eq!(get(&st.admin_url("/nope")).await.0, 404);
    let r = client()
        .post(st.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = client()
        .head(st.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
    // The registry port does not serve the admin endpoints.
    assert_ne!(get(&format!("{}/metrics", st.url())).await.0, 200);

    // The readiness probe leaves nothing behind in the cache.
    let tmp = stowage::test_hooks::tmp_dir(st.dir.path());
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".readyz"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A cache directory that cannot be written to: 503 with the reason,
    // while /healthz stays 200. (Tests run as root, for whom permission
    // bits do not block writes: replace the directory by a file instead.)
    let aside = st.dir.path().join("tmp.aside");
    std::fs::rename(&tmp, &aside).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let (status, body) = get(&st.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not writable"), "{body}");
    assert!(body.contains(&tmp.display().to_string()), "{body}");
    assert_eq!(get(&st.admin_url("/healthz")).await.0, 200);

    // Repaired: ready again.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::rename(&aside, &tmp).unwrap();
    assert_eq!(get(&st.admin_url("/readyz")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_can_be_off() {
    let up = FakeUpstream::start().await;
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "")
        .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"off\"");
    let st = start_stowage_toml(dir, &toml).await;
    assert_eq!(st.admin, None);
    get_ok(&client(), &st.v2("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_fails_while_draining_then_admin_stops() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1 << 20);
    up.add_blob(blob.data.clone());
    let hold = up.hold(&blob.digest);
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "").replace("\"2s\"", "\"20s\"");
    let cfg = stowage::Config::from_toml_str(&toml).unwrap();
    let server = stowage::Server::bind(cfg).await.unwrap();
    let addr = server.local_addr();
    let admin = server.admin_addr().expect("admin listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let admin_url = |p: &str| format!("http://{admin}{p}");
    wait_ready(&admin_url("/readyz")).await;

    // A response in flight, held upstream.
    let url = format!("http://{addr}/v2/library/x/blobs/{}", blob.digest);
    let resp = within(10, "held GET", client().get(&url).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    stop.send(()).unwrap();

    // Draining: not ready (listener closed), still alive, metrics served.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&admin_url("/readyz")).await;
        if status == 503 {
            assert!(body.contains("listener"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&admin_url("/healthz")).await.0, 200);
    assert_eq!(get(&admin_url("/metrics")).await.0, 200);

    hold.release();
    let body = within(20, "held body", resp.bytes()).await.unwrap();
    assert_eq!(sha256_digest(&body), blob.digest);
    within(20, "server shutdown", run).await.unwrap().unwrap();
    // The admin listener is closed too.
    assert!(tokio::net::TcpStream::connect(admin).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_ids() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/hello", "1", &img);
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    let toml = config_toml(&dir.path().join("cache"), &up.url(), "")
        + "\n[log]\nformat = \"json\"\nlevel = \"info\"\n";
    std::fs::write(&config, &toml).unwrap();
    let mut child = Process::with_config(&config, &[]);

    let parse = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: String = child.wait_line(|l| {
        let v = parse(l);
        (v["message"] == "stowage listening").then(|| v["addr"].as_str().unwrap().to_string())
    });
    let url = format!("http://{addr}/v2/hello/manifests/1");
    let r = client()
        .get(&url)
        .header("x-request-id", "json-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-request-id").as_deref(), Some("json-test-1"));
    r.bytes().await.unwrap();

    let line = child.wait_line(|l| {
        let v = parse(l);
        (v["message"] == "request" && v["request_id"] == "json-test-1").then_some(v)
    });
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v2/hello/manifests/1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["cache"], "miss");
    assert_eq!(line["level"], "INFO");
    for l in &child.log() {
        parse(l);
    }
}

/// The address of the registry listener, from the human-format log line.
fn listening_addr(child: &mut Process) -> String {
    child.wait_line(|l| {
        l.contains("stowage listening").then(|| {
            let at = l.find("addr=").unwrap() + 5;
            l[at..].split_whitespace().next().unwrap().to_string()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_logs_carry_request_ids() {
    let up = FakeUpstream::start().await;
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        config_toml(&dir.path().join("cache"), &up.url(), ""),
    )
    .unwrap();
    let mut child = Process::with_config(&config, &[]);
    let addr: String = listening_addr(&mut child);
    let r = client()
        .get(format!("http://{addr}/v2/"))
        .send()
        .await
        .unwrap();
    let id = header(&r, "x-request-id").unwrap();
    r.bytes().await.unwrap();
    let line = child.wait_line(|l| {
        l.contains(&format!("request_id={id}"))
            .then(|| l.to_string())
    });
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("path=/v2/"), "{line}");

    // A failure's report carries the id its client was given.
    let r = client()
        .get(format!("http://{addr}/v2/library/absent/manifests/1"))
        .header("x-request-id", "failing-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    r.bytes().await.unwrap();
    let line = child.wait_line(|l| l.contains("request failed").then(|| l.to_string()));
    assert!(line.contains("request_id=failing-1"), "{line}");
}

/// The request span, opened once a request waits, still frames what is
/// logged while the request runs: a stale-serving warning names the
/// request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_request_warnings_carry_the_request_span() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/hello", "1", &img);
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    std::fs::write(
        &config,
        config_toml(&dir.path().join("cache"), &up.url(), "tag_ttl = \"1s\""),
    )
    .unwrap();
    let mut child = Process::with_config(&config, &[]);
    let addr: String = listening_addr(&mut child);
    let url = format!("http://{addr}/v2/hello/manifests/1");
    let get = |id: &'static str| {
        let url = url.clone();
        async move {
            let r = client()
                .get(&url)
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{id}");
            r.bytes().await.unwrap();
        }
    };
    get("fresh-1").await;
    up.set_failure(Failure::Unavailable);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    get("stale-1").await;
    let line = child.wait_line(|l| l.contains("serving stale manifest").then(|| l.to_string()));
    assert!(line.contains("request{request_id=stale-1}"), "{line}");
}

/// Request lines are written by stowage's own formatter, not through the
/// subscriber: the filter must still be able to switch them off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_obey_the_log_filter() {
    let up = FakeUpstream::start().await;
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    let toml = config_toml(&dir.path().join("cache"), &up.url(), "")
        + "\n[log]\nlevel = \"info,stowage::http::access_log=off\"\n";
    std::fs::write(&config, &toml).unwrap();
    let mut child = Process::with_config(&config, &[]);
    let addr: String = listening_addr(&mut child);
    let r = client()
        .get(format!("http://{addr}/v2/"))
        .header("x-request-id", "filtered-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    child.signal("TERM");
    within(15, "stowage exits on SIGTERM", async {
        while child.is_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Its other info lines are there; the request line is not.
    child.wait_line(|l| l.contains("shutting down").then_some(()));
    let log = child.log();
    assert!(
        !log.iter()
            .any(|l| l.contains("filtered-1") || l.contains("access_log")),
        "{log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_request_log_is_written_whole_at_shutdown() {
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[10]);
    up.push_image("library/hello", "1", &img);
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("stowage.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Request lines only: no other line (such as those of the shutdown)
    // writes the buffer out before the exit does.
    let toml = config_toml(&dir.path().join("cache"), &up.url(), "").replace(
        "127.0.0.1:0\"\nadmin",
        &format!("127.0.0.1:{port}\"\nadmin"),
    ) + "\n[log]\nformat = \"json\"\nbuffer = \"64KiB\"\n\
           level = \"warn,stowage::http::access_log=info\"\n";
    std::fs::write(&config, &toml).unwrap();
    let mut child = Process::with_config(&config, &[]);
    let parse = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {line}"))
    };
    wait_http_ok(&format!("http://127.0.0.1:{port}/v2/")).await;
    let url = format!("http://127.0.0.1:{port}/v2/hello/manifests/1");
    let c = client();
    let n = 200;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(&url)
                .header("x-request-id", format!("buffered-{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Straight away: the lines are (most likely) still in the buffer, and
    // shutdown must write them out.
    child.signal("TERM");
    within(15, "stowage exits on SIGTERM", async {
        while child.is_running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let logged = || {
        child
            .log()
            .iter()
            .map(|l| parse(l))
            .filter(|v| {
                v["message"] == "request"
                    && v["request_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("buffered-"))
            })
            .count()
    };
    within(5, "request lines after exit", async {
        while logged() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(logged(), n, "every request logged once, each line whole");
}

/// Reads until the server closes the connection; how long that took.
async fn time_to_close(tcp: &mut tokio::net::TcpStream, started: Instant) -> Duration {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    within(15, "server to close the connection", async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
}

/// Review item of issue 11: the admin listener had no connection limit, no
/// header timeout and no idle timeout, so a silent or dribbling client held
/// a connection (and a task) forever. It gets the registry's `[limits]`
/// (its own connection slots, so neither listener can starve the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_has_the_connection_header_and_idle_limits() {
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpStream;
    let up = FakeUpstream::start().await;
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "")
        + "\n[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\n";
    let st = start_stowage_toml(dir, &toml).await;
    let admin = st.admin.unwrap();
    wait_ready(&st.admin_url("/readyz")).await;

    // A client dribbling a request head: dropped after the header timeout.
    let started = Instant::now();
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let took = time_to_close(&mut slow, started).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "slow admin client dropped after {took:?}, expected about 1 s"
    );
    // A silent one too.
    let started = Instant::now();
    let mut silent = TcpStream::connect(admin).await.unwrap();
    let took = time_to_close(&mut silent, started).await;
    assert!(
        took < Duration::from_secs(4),
        "silent admin client dropped after {took:?}"
    );

    // Two slots: a third connection waits until one frees up.
    drop(st);
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "")
        + "\n[limits]\nmax_connections = 2\nheader_read_timeout = \"30s\"\n";
    let st = start_stowage_toml(dir, &toml).await;
    let admin = st.admin.unwrap();
    let a = TcpStream::connect(admin).await.unwrap();
    let _b = TcpStream::connect(admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = tokio::time::timeout(
        Duration::from_millis(700),
        client().get(st.admin_url("/healthz")).send(),
    )
    .await;
    assert!(
        queued.is_err(),
        "admin served beyond max_connections: {queued:?}"
    );
    // The registry listener has slots of its own.
    let (status, _) = get(&st.v2("")).await;
    assert_eq!(status, 200);
    drop(a);
    let (status, _) = get(&st.admin_url("/healthz")).await;
    assert_eq!(status, 200);
}
