//! TLS termination: pulls over HTTPS with a CA generated here, ALPN (h2 and
//! http/1.1), TLS 1.2 and 1.3, certificate hot reload (file change and
//! SIGHUP) without dropping established connections, mTLS, and the
//! handshake timeout.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::*;
use common::*;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Starts stowage with TLS from `issued` (written into `certs`), plus
/// `tls_extra` lines in `[tls]` and `more` TOML after it.
async fn start_tls(
    up: &FakeUpstream,
    certs: &Path,
    issued: &Issued,
    tls_extra: &str,
    more: &str,
) -> Stowage {
    let (cert, key) = write_pair(certs, issued);
    let dir = TempDir::new().unwrap();
    let toml = config_toml(dir.path(), &up.url(), "") + &tls_table(&cert, &key, tls_extra) + more;
    start_stowage_toml(dir, &toml).await
}

fn seeded(up: &FakeUpstream) -> Image {
    let img = make_image(Format::Oci, &[1000, 300_000]);
    up.push_image("library/alpine", "3.20", &img);
    img
}

/// Opens a TLS connection and returns the certificate the server showed.
async fn served_leaf(st: &Stowage, ca: &Ca) -> Vec<u8> {
    let s = within(
        10,
        "TLS connect",
        connect(st.addr, client_config(&ca.cert_pem, &[], None, BOTH)),
    )
    .await
    .expect("TLS handshake failed");
    peer_leaf(&s).to_vec()
}

/// Waits (up to 10 s) until new connections are served `want`.
async fn wait_for_leaf(st: &Stowage, ca: &Ca, want: &Issued, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_leaf(st, ca).await == want.der.to_vec() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: new certificate not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reqwest_pulls_an_image_over_tls() {
    let up = FakeUpstream::start().await;
    let img = seeded(&up);
    let ca = Ca::new("stowage test CA");
    let certs = TempDir::new().unwrap();
    let st = start_tls(&up, certs.path(), &ca.server("stowage-1", 1), "", "").await;

    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{}", st.addr.port());
    let (h, body) = get_ok(&c, &format!("{base}/v2/")).await;
    assert_eq!(&body[..], b"{}");
    assert_eq!(
        h.get("docker-distribution-api-version")
            .map(|v| v.to_str().unwrap()),
        Some("registry/2.0")
    );
    let r = within(
        30,
        "manifest",
        c.get(format!("{base}/v2/alpine/manifests/3.20"))
            .header("accept", OCI_MANIFEST)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest);
    for b in img.blobs() {
        let (_, body) = get_ok(&c, &format!("{base}/v2/alpine/blobs/{}", b.digest)).await;
        assert_eq!(body, b.data, "blob {} over TLS", b.digest);
    }

    // Plain HTTP on the TLS port gets no answer.
    let plain = c
        .get(format!("http://127.0.0.1:{}/v2/", st.addr.port()))
        .send()
        .await;
    assert!(
        plain.as_ref().map_or(true, |r| r.status() != 200),
        "plain HTTP on a TLS listener answered: {plain:?}"
    );
    // A client that does not trust the CA fails the handshake.
    let untrusting = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(untrusting.get(format!("{base}/v2/")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alpn_and_protocol_versions() {
    let up = FakeUpstream::start().await;
    let img = seeded(&up);
    let blob = &img.layers[0];
    let path = format!("/v2/alpine/blobs/{}", blob.digest);
    let ca = Ca::new("stowage test CA");
    let certs = TempDir::new().unwrap();
    let st = start_tls(&up, certs.path(), &ca.server("stowage-1", 1), "", "").await;

    // h2 offered first: h2 negotiated and served.
    let s = connect(
        st.addr,
        client_config(&ca.cert_pem, &[b"h2", b"http/1.1"], None, BOTH),
    )
    .await
    .unwrap();
    assert_eq!(alpn(&s).as_deref(), Some("h2"));
    let mut conn = Conn::start(s, true).await.unwrap();
    for _ in 0..2 {
        let (status, _, body, version) = within(30, "h2 GET", conn.get(&path, None)).await.unwrap();
        assert_eq!((status, version), (200, http::Version::HTTP_2));
        assert_eq!(body, blob.data);
    }

    // Only http/1.1 offered, or no ALPN at all: HTTP/1.1.
    for offer in [&[b"http/1.1".as_slice()][..], &[][..]] {
        let s = connect(st.addr, client_config(&ca.cert_pem, offer, None, BOTH))
            .await
            .unwrap();
        let expected = if offer.is_empty() {
            None
        } else {
            Some("http/1.1")
        };
        assert_eq!(alpn(&s).as_deref(), expected);
        let mut conn = Conn::start(s, false).await.unwrap();
        let (status, _, body, version) = within(30, "h1 GET", conn.get(&path, None)).await.unwrap();
        assert_eq!((status, version), (200, http::Version::HTTP_11));
        assert_eq!(body, blob.data);
    }

    // TLS 1.2 and TLS 1.3 each work on their own.
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let s = connect(
            st.addr,
            client_config(&ca.cert_pem, &[b"h2"], None, &[version]),
        )
        .await
        .unwrap_or_else(|e| panic!("{want:?} handshake: {e}"));
        assert_eq!(s.get_ref().1.protocol_version(), Some(want));
        let mut conn = Conn::start(s, true).await.unwrap();
        let (status, _, _, _) = conn.get("/v2/", None).await.unwrap();
        assert_eq!(status, 200, "{want:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_replaced_on_disk_is_served_to_new_connections() {
    let up = FakeUpstream::start().await;
    let img = seeded(&up);
    let blob = &img.layers[1];
    let path = format!("/v2/alpine/blobs/{}", blob.digest);
    let ca = Ca::new("stowage test CA");
    let certs = TempDir::new().unwrap();
    let first = ca.server("stowage-1", 1);
    let st = start_tls(&up, certs.path(), &first, "reload_interval = \"100ms\"", "").await;

    // An established connection of each kind, before the change.
    let cfg = client_config(&ca.cert_pem, &[b"h2"], None, BOTH);
    let s = connect(st.addr, cfg).await.unwrap();
    assert_eq!(peer_leaf(&s), first.der);
    let mut old_h2 = Conn::start(s, true).await.unwrap();
    let s = connect(st.addr, client_config(&ca.cert_pem, &[], None, BOTH))
        .await
        .unwrap();
    let mut old_h1 = Conn::start(s, false).await.unwrap();
    assert_eq!(old_h2.get(&path, None).await.unwrap().0, 200);
    assert_eq!(old_h1.get(&path, None).await.unwrap().0, 200);

    // Replace the pair on disk: new handshakes get it, without a restart.
    let second = ca.server("stowage-2", 2);
    write_pair(certs.path(), &second);
    wait_for_leaf(&st, &ca, &second, "after replacing the certificate").await;

    // The old connections were not dropped and still work.
    for (name, conn) in [("h2", &mut old_h2), ("http/1.1", &mut old_h1)] {
        let (status, _, body, _) = within(30, "old connection", conn.get(&path, None))
            .await
            .unwrap_or_else(|e| panic!("established {name} connection broke by the reload: {e}"));
        assert_eq!(status, 200);
        assert_eq!(body, blob.data);
    }

    // A broken certificate file is rejected; the previous one stays.
    std::fs::write(
        certs.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        served_leaf(&st, &ca).await,
        second.der.to_vec(),
        "garbage certificate taken up"
    );

    // A certificate whose key has not been written yet (key mismatch) is
    // rejected too, and taken up once the key follows.
    let third = ca.server("stowage-3", 3);
    write_atomic(&certs.path().join("tls.crt"), &third.cert_pem);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        served_leaf(&st, &ca).await,
        second.der.to_vec(),
        "mismatched key taken up"
    );
    write_atomic(&certs.path().join("tls.key"), &third.key_pem);
    wait_for_leaf(&st, &ca, &third, "after the key followed").await;

    // Still serving blobs on every connection.
    assert_eq!(old_h2.get(&path, None).await.unwrap().0, 200);
    let s = connect(st.addr, client_config(&ca.cert_pem, &[b"h2"], None, BOTH))
        .await
        .unwrap();
    let mut fresh = Conn::start(s, true).await.unwrap();
    assert_eq!(fresh.get(&path, None).await.unwrap().2, blob.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_the_certificate_of_the_binary() {
    let up = FakeUpstream::start().await;
    seeded(&up);
    let ca = Ca::new("stowage test CA");
    let certs = TempDir::new().unwrap();
    let first = ca.server("stowage-1", 1);
    let (cert, key) = write_pair(certs.path(), &first);
    let dir = TempDir::new().unwrap();
    // Polling off: only SIGHUP reloads.
    let toml = config_toml(dir.path(), &up.url(), "")
        + &tls_table(&cert, &key, "reload_interval = \"0s\"")
        + "\n[log]\nformat = \"json\"\n";
    let cfg_path = dir.path().join("stowage.toml");
    std::fs::write(&cfg_path, toml).unwrap();

    let mut child = Process::with_config(&cfg_path, &[("RUST_LOG", "stowage=info")]);
    let addr = child.listening_addr();
    let st_leaf = |ca: &Ca| {
        let cfg = client_config(&ca.cert_pem, &[], None, BOTH);
        async move { peer_leaf(&connect(addr, cfg).await.unwrap()).to_vec() }
    };
    assert_eq!(st_leaf(&ca).await, first.der.to_vec());
    let s = connect(addr, client_config(&ca.cert_pem, &[b"h2"], None, BOTH))
        .await
        .unwrap();
    let mut old = Conn::start(s, true).await.unwrap();
    assert_eq!(old.get("/v2/", None).await.unwrap().0, 200);

    let second = ca.server("stowage-2", 2);
    write_pair(certs.path(), &second);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        st_leaf(&ca).await,
        first.der.to_vec(),
        "reloaded without SIGHUP although polling is off"
    );

    child.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while st_leaf(&ca).await != second.der.to_vec() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate: {:?}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.is_running(), "stowage exited on SIGHUP");
    assert_eq!(
        old.get("/v2/", None).await.unwrap().0,
        200,
        "established connection after SIGHUP"
    );

    // A bad file on SIGHUP: logged, the old certificate kept, still running.
    std::fs::write(certs.path().join("tls.key"), "not a key\n").unwrap();
    child.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !child
        .log()
        .iter()
        .any(|l| l.contains("TLS reload rejected"))
    {
        assert!(
            Instant::now() < deadline,
            "no log line for a rejected reload: {:?}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(st_leaf(&ca).await, second.der.to_vec());
    assert!(child.is_running(), "stowage exited after a bad reload");
}

/// Connects over mTLS with `cfg` and asks for /v2/: Err(what failed) or
/// the status.
async fn attempt(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<u16, String> {
    attempt_resuming(addr, cfg).await.map(|(status, _)| status)
}

/// [`attempt`], and whether its handshake resumed a session.
async fn attempt_resuming(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(u16, bool), String> {
    let s = connect(addr, cfg)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut conn = Conn::start(s, false)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let r = within(10, "mTLS request", conn.get("/v2/", None)).await;
    r.map(|r| (r.0, resumed))
        .map_err(|e| format!("request: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_requires_a_client_certificate_from_the_ca() {
    let up = FakeUpstream::start().await;
    let img = seeded(&up);
    let blob = &img.layers[0];
    let ca = Ca::new("stowage server CA");
    let clients = Ca::new("stowage client CA");
    let certs = TempDir::new().unwrap();
    let ca_file = certs.path().join("clients.pem");
    std::fs::write(&ca_file, &clients.cert_pem).unwrap();
    let st = start_tls(
        &up,
        certs.path(),
        &ca.server("stowage-1", 1),
        &format!("client_ca = {:?}", ca_file.to_str().unwrap()),
        "",
    )
    .await;

    // No client certificate: refused (in TLS 1.3 the alert arrives after the
    // client's side of the handshake, so the request fails).
    for versions in [BOTH, &[&rustls::version::TLS12][..]] {
        let r = attempt(st.addr, client_config(&ca.cert_pem, &[], None, versions)).await;
        assert!(r.is_err(), "no client certificate but got {r:?}");
    }
    // A certificate from another CA: refused.
    let stranger = ca.client("stranger");
    let r = attempt(
        st.addr,
        client_config(&ca.cert_pem, &[], Some(&stranger), BOTH),
    )
    .await;
    assert!(
        r.is_err(),
        "client certificate from an unknown CA but got {r:?}"
    );

    // A certificate from the client CA: the pull works, over h2 too.
    let me = clients.client("builder-01");
    assert_eq!(
        attempt(st.addr, client_config(&ca.cert_pem, &[], Some(&me), BOTH)).await,
        Ok(200)
    );
    let s = connect(
        st.addr,
        client_config(&ca.cert_pem, &[b"h2"], Some(&me), BOTH),
    )
    .await
    .unwrap();
    let mut conn = Conn::start(s, true).await.unwrap();
    let (status, _, body, _) = conn
        .get(&format!("/v2/alpine/blobs/{}", blob.digest), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, blob.data);
    assert_eq!(up.blob_gets(&blob.digest), 1);
}

/// A client CA replaced on disk: a client of the old CA cannot come back by
/// resuming a session it got before (resumption skips the certificate
/// check, so the sessions of the old trust are dropped with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_client_ca_is_not_bypassed_by_resuming_a_session() {
    let up = FakeUpstream::start().await;
    seeded(&up);
    let ca = Ca::new("stowage server CA");
    let old = Ca::new("old client CA");
    let new = Ca::new("new client CA");
    let certs = TempDir::new().unwrap();
    let ca_file = certs.path().join("clients.pem");
    std::fs::write(&ca_file, &old.cert_pem).unwrap();
    let st = start_tls(
        &up,
        certs.path(),
        &ca.server("stowage-1", 1),
        &format!(
            "client_ca = {:?}\nreload_interval = \"100ms\"",
            ca_file.to_str().unwrap()
        ),
        "",
    )
    .await;
    let me = old.client("builder-01");
    // One config throughout: it keeps the sessions the server gives it.
    let resuming = client_config(&ca.cert_pem, &[], Some(&me), BOTH);
    assert_eq!(attempt(st.addr, resuming.clone()).await, Ok(200));
    // The client does resume (else the check below would test nothing).
    assert_eq!(
        attempt_resuming(st.addr, resuming.clone()).await,
        Ok((200, true))
    );

    std::fs::write(&ca_file, &new.cert_pem).unwrap();
    // Reloaded once a fresh handshake with the old CA's certificate fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempt(st.addr, client_config(&ca.cert_pem, &[], Some(&me), BOTH))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the new client CA was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = attempt(st.addr, resuming).await;
    assert!(r.is_err(), "resumed a session of the old client CA: {r:?}");
    // The new CA's clients get in.
    let newcomer = new.client("builder-02");
    assert_eq!(
        attempt(
            st.addr,
            client_config(&ca.cert_pem, &[], Some(&newcomer), BOTH)
        )
        .await,
        Ok(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_tls_handshake_is_dropped() {
    let up = FakeUpstream::start().await;
    let ca = Ca::new("stowage test CA");
    let certs = TempDir::new().unwrap();
    let issued = ca.server("stowage-1", 1);
    let st = start_tls(
        &up,
        certs.path(),
        &issued,
        "handshake_timeout = \"1s\"",
        "\n[limits]\nheader_read_timeout = \"30s\"\n",
    )
    .await;

    // A TLS record header promising a ClientHello that never comes.
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(st.addr).await.unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let took = within(10, "server to drop a stalled handshake", async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "stalled handshake dropped after {took:?}, expected about 1 s"
    );
    // Complete handshakes are still served.
    assert_eq!(served_leaf(&st, &ca).await, issued.der.to_vec());
}
