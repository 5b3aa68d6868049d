//! bench-client: the load client of `bench/run.sh`.
//!
//! Sends `--requests` HTTP/1.1 GETs for one URL, `--concurrency` at a time,
//! one connection per request (a thread per concurrent slot, blocking I/O,
//! 256 KiB reads), and prints one JSON object on stdout: a summary and every
//! request's status, times and byte count.
//!
//! * Time to first byte is measured from just before the request is written
//!   (after connect and, for https, the TLS handshake) to the first byte of the
//!   response head (`ttfb_head_ms`) and to the first byte of the body
//!   (`ttfb_ms`, what the tables report).
//! * `--sync`: every worker connects (and handshakes) first, then all send
//!   their first request at the same instant (all wait on one read-write
//!   lock, released at once; `start_ms` in the results shows how close
//!   together they went): the "storm".
//! * Every body is verified. `--expect FILE` is the expected body; with
//!   `--digest sha256:HEX` the file itself is hashed once at start-up and must
//!   match. `--verify cmp` (default) then compares each body byte for byte
//!   with the file (cheap: the client must not compete with the server for
//!   the two cores), `--verify sha256` hashes each body instead, `--verify
//!   none` only counts bytes (`--expect-size`).
//! * `--cacert PEM` for https URLs (rustls, ring, ALPN http/1.1). The
//!   negotiated protocol version and cipher suite are in the summary (`tls`),
//!   so that two servers are known to have been compared on the same cipher.
//! * `--url` may be given several times (the same path on several servers,
//!   e.g. the nodes of a cluster): request `i` goes to URL `i % n`, and each
//!   result names its `target` (the index of its URL).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const BUF: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Verify {
    Cmp,
    Sha256,
    None,
}

struct Opts {
    urls: Vec<String>,
    requests: usize,
    concurrency: usize,
    expect: Option<Arc<Vec<u8>>>,
    expect_size: Option<u64>,
    digest: Option<String>,
    verify: Verify,
    cacert: Option<String>,
    headers: Vec<String>,
    sync: bool,
    timeout: Duration,
}

struct Target {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    path: String,
}

#[derive(Default, Clone)]
struct Record {
    start_ms: f64,
    ttfb_head_ms: f64,
    ttfb_ms: f64,
    total_ms: f64,
    /// Wait for the final read of the body (for stowage: the held-back last
    /// byte, released once the fill is verified and committed).
    last_read_ms: f64,
    status: u16,
    bytes: u64,
    ok: bool,
    error: String,
    /// Index of the URL (with several `--url`).
    target: usize,
    /// Negotiated TLS version and cipher suite, for https.
    tls: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-client --url URL [--url URL]... [--requests N] [--concurrency C] [--sync]\n\
         \x20      [--expect FILE [--digest sha256:HEX]] [--expect-size BYTES]\n\
         \x20      [--verify cmp|sha256|none] [--cacert PEM] [--header 'K: V']... [--timeout SECS]"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        urls: Vec::new(),
        requests: 0,
        concurrency: 1,
        expect: None,
        expect_size: None,
        digest: None,
        verify: Verify::Cmp,
        cacert: None,
        headers: Vec::new(),
        sync: false,
        timeout: Duration::from_secs(300),
    };
    let mut expect_path = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--url" => o.urls.push(val()),
            "--requests" => o.requests = val().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => o.concurrency = val().parse().unwrap_or_else(|_| usage()),
            "--expect" => expect_path = Some(val()),
            "--expect-size" => o.expect_size = Some(val().parse().unwrap_or_else(|_| usage())),
            "--digest" => o.digest = Some(val()),
            "--verify" => {
                o.verify = match val().as_str() {
                    "cmp" => Verify::Cmp,
                    "sha256" => Verify::Sha256,
                    "none" => Verify::None,
                    _ => usage(),
                }
            }
            "--cacert" => o.cacert = Some(val()),
            "--header" | "-H" => o.headers.push(val()),
            "--sync" => o.sync = true,
            "--timeout" => {
                o.timeout = Duration::from_secs_f64(val().parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    if o.urls.is_empty() || o.concurrency == 0 {
        usage();
    }
    if o.requests == 0 {
        o.requests = o.concurrency;
    }
    if let Some(p) = expect_path {
        let data = std::fs::read(&p).unwrap_or_else(|e| {
            eprintln!("bench-client: reading {p}: {e}");
            std::process::exit(2)
        });
        if let Some(d) = &o.digest {
            let got = format!("sha256:{}", hex(&Sha256::digest(&data)));
            if &got != d {
                eprintln!("bench-client: {p} hashes to {got}, not {d}");
                std::process::exit(2)
            }
        }
        o.expect_size = Some(data.len() as u64);
        o.expect = Some(Arc::new(data));
    }
    if o.verify != Verify::None && o.expect.is_none() {
        eprintln!("bench-client: --verify cmp/sha256 needs --expect FILE (or use --verify none)");
        std::process::exit(2)
    }
    if o.verify == Verify::Sha256 && o.digest.is_none() {
        eprintln!("bench-client: --verify sha256 needs --digest");
        std::process::exit(2)
    }
    o
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn target(o: &Opts, url: &str) -> Target {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        usage()
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or_else(|_| usage())),
        None => (authority.to_string(), if tls { 443 } else { 80 }),
    };
    let tls = tls.then(|| {
        let mut roots = rustls::RootCertStore::empty();
        let path = o.cacert.as_deref().unwrap_or_else(|| {
            eprintln!("bench-client: https needs --cacert");
            std::process::exit(2)
        });
        let pem = std::fs::read(path).expect("reading --cacert");
        for c in rustls_pemfile::certs(&mut &pem[..]) {
            roots
                .add(c.expect("PEM certificate"))
                .expect("CA certificate");
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    });
    Target {
        tls,
        host,
        port,
        path: path.to_string(),
    }
}

type Conn = Box<dyn ReadWrite + Send>;
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn connect(t: &Target, timeout: Duration) -> Result<(Conn, String), String> {
    let sock =
        TcpStream::connect((t.host.as_str(), t.port)).map_err(|e| format!("connect: {e}"))?;
    sock.set_nodelay(true).ok();
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    match &t.tls {
        None => Ok((Box::new(sock), String::new())),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| format!("server name: {e}"))?;
            let mut conn = rustls::ClientConnection::new(cfg.clone(), name)
                .map_err(|e| format!("tls: {e}"))?;
            let mut sock = sock;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)
                    .map_err(|e| format!("tls handshake: {e}"))?;
            }
            let tls = format!(
                "{}/{}",
                conn.protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default(),
                conn.negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()))
                    .unwrap_or_default()
            );
            Ok((Box::new(rustls::StreamOwned::new(conn, sock)), tls))
        }
    }
}

struct Checker<'a> {
    o: &'a Opts,
    pos: u64,
    sha: Option<Sha256>,
}

impl Checker<'_> {
    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        if self.o.verify == Verify::Cmp {
            let exp = self.o.expect.as_ref().unwrap();
            let start = self.pos as usize;
            let end = start + chunk.len();
            if end > exp.len() {
                return Err(format!("body longer than expected ({} bytes)", exp.len()));
            }
            if exp[start..end] != *chunk {
                return Err(format!(
                    "body differs from the expected bytes in {start}..{end}"
                ));
            }
        }
        if let Some(h) = &mut self.sha {
            h.update(chunk);
        }
        self.pos += chunk.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<(), String> {
        if let Some(n) = self.o.expect_size {
            if self.pos != n {
                return Err(format!("body is {} bytes, expected {n}", self.pos));
            }
        }
        if let Some(h) = self.sha {
            let got = format!("sha256:{}", hex(&h.finalize()));
            if Some(&got) != self.o.digest.as_ref() {
                return Err(format!("body hashes to {got}"));
            }
        }
        Ok(())
    }
}

fn one(o: &Opts, t: &Target, conn: Conn, rec: &mut Record, t0: Instant) -> Result<(), String> {
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: stowage-bench-client\r\nConnection: close\r\n", t.path, t.host, t.port);
    for h in &o.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut r = BufReader::with_capacity(BUF, conn);
    let start = Instant::now();
    rec.start_ms = ms(start - t0);
    r.get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    r.get_mut().flush().map_err(|e| format!("flush: {e}"))?;
    if r.fill_buf()
        .map_err(|e| format!("reading head: {e}"))?
        .is_empty()
    {
        return Err("connection closed before the response".into());
    }
    rec.ttfb_head_ms = ms(start.elapsed());
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("status line: {e}"))?;
    rec.status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut len: Option<u64> = None;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| format!("header: {e}"))?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    if rec.status != 200 {
        return Err(format!("HTTP status {}", rec.status));
    }
    let mut ck = Checker {
        o,
        pos: 0,
        sha: (o.verify == Verify::Sha256).then(Sha256::new),
    };
    let mut buf = vec![0u8; BUF];
    let mut first = true;
    let mut read_body = |r: &mut BufReader<Conn>,
                         max: u64,
                         ck: &mut Checker,
                         rec: &mut Record|
     -> Result<usize, String> {
        let want = (max.min(BUF as u64)) as usize;
        let before = Instant::now();
        let n = r
            .read(&mut buf[..want])
            .map_err(|e| format!("body after {} bytes: {e}", ck.pos))?;
        if n > 0 {
            rec.last_read_ms = ms(before.elapsed());
        }
        if n > 0 && first {
            first = false;
            rec.ttfb_ms = ms(start.elapsed());
        }
        ck.feed(&buf[..n])?;
        rec.bytes += n as u64;
        Ok(n)
    };
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)
                .map_err(|e| format!("chunk size: {e}"))?;
            let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                break;
            }
            let mut left = size;
            while left > 0 {
                let n = read_body(&mut r, left, &mut ck, rec)?;
                if n == 0 {
                    return Err(format!(
                        "connection closed inside a chunk after {} bytes",
                        ck.pos
                    ));
                }
                left -= n as u64;
            }
            line.clear();
            r.read_line(&mut line)
                .map_err(|e| format!("chunk end: {e}"))?;
        }
    } else if let Some(n) = len {
        let mut left = n;
        while left > 0 {
            let got = read_body(&mut r, left, &mut ck, rec)?;
            if got == 0 {
                return Err(format!(
                    "connection closed after {} of {n} body bytes",
                    ck.pos
                ));
            }
            left -= got as u64;
        }
    } else {
        while read_body(&mut r, u64::MAX, &mut ck, rec)? > 0 {}
    }
    if first {
        rec.ttfb_ms = ms(start.elapsed());
    }
    ck.finish()?;
    rec.total_ms = ms(start.elapsed());
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() {
    let o = Arc::new(parse_args());
    let targets: Arc<Vec<Target>> = Arc::new(o.urls.iter().map(|u| target(&o, u)).collect());
    let workers = o.concurrency.min(o.requests);
    // With --sync, worker w takes request w first (it connected ahead to
    // that request's target); later requests come from the counter.
    let next = Arc::new(AtomicUsize::new(if o.sync { workers } else { 0 }));
    let records = Arc::new(Mutex::new(vec![Record::default(); o.requests]));
    // The start gate: the main thread holds the write lock, every worker
    // blocks on a read lock, and releasing the write lock wakes them all with
    // one futex wake (readers share the lock: no hand-over from thread to
    // thread). A Barrier's mutex hands over one thread at a time, which on two
    // busy cores spread the "simultaneous" starts over up to a second.
    let ready = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(RwLock::new(()));
    let closed = gate.write().unwrap();
    let t0 = Arc::new(OnceLock::<Instant>::new());
    let mut handles = Vec::new();
    for w in 0..workers {
        let (o, targets, next, records, ready, gate, t0) = (
            o.clone(),
            targets.clone(),
            next.clone(),
            records.clone(),
            ready.clone(),
            gate.clone(),
            t0.clone(),
        );
        handles.push(std::thread::spawn(move || {
            // With --sync, each worker connects ahead to the target of its
            // first request, request w.
            let mut first = o.sync.then_some(w);
            let mut pre = first.map(|i| connect(&targets[i % targets.len()], o.timeout));
            ready.fetch_add(1, Ordering::SeqCst);
            drop(gate.read().unwrap());
            let start = *t0.get().expect("t0 is set before go");
            loop {
                let i = match first.take() {
                    Some(i) => i,
                    None => next.fetch_add(1, Ordering::SeqCst),
                };
                if i >= o.requests {
                    break;
                }
                let ti = i % targets.len();
                let t = &targets[ti];
                let mut rec = Record {
                    target: ti,
                    ..Record::default()
                };
                let res = match pre.take().unwrap_or_else(|| connect(t, o.timeout)) {
                    Ok((conn, tls)) => {
                        rec.tls = tls;
                        one(&o, t, conn, &mut rec, start)
                    }
                    Err(e) => Err(e),
                };
                match res {
                    Ok(()) => rec.ok = true,
                    Err(e) => {
                        rec.error = e;
                        rec.total_ms = ms(start.elapsed()) - rec.start_ms;
                    }
                }
                records.lock().unwrap()[i] = rec;
            }
        }));
    }
    // Every worker has connected (with --sync) and waits at the gate: start
    // the clock and open it.
    while ready.load(Ordering::SeqCst) < workers {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20)); // let the last ones block on the gate
    t0.set(Instant::now()).expect("t0 set once");
    drop(closed);
    for h in handles {
        h.join().expect("worker thread panicked");
    }
    let wall = t0.get().unwrap().elapsed().as_secs_f64();
    let recs = records.lock().unwrap().clone();
    let ok = recs.iter().filter(|r| r.ok).count();
    let bytes: u64 = recs.iter().map(|r| r.bytes).sum();
    let mut ttfb: Vec<f64> = recs.iter().filter(|r| r.ok).map(|r| r.ttfb_ms).collect();
    ttfb.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut total: Vec<f64> = recs.iter().filter(|r| r.ok).map(|r| r.total_ms).collect();
    total.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let tls = recs
        .iter()
        .find(|r| !r.tls.is_empty())
        .map(|r| r.tls.clone())
        .unwrap_or_default();
    let first_error = recs
        .iter()
        .find(|r| !r.ok)
        .map(|r| r.error.clone())
        .unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "{{\"url\":{},\"requests\":{},\"concurrency\":{},\"ok\":{},\"failed\":{},\"bytes\":{},\"wall_s\":{},\"gbps\":{},\
         \"ttfb_p50_ms\":{},\"ttfb_max_ms\":{},\"total_p50_ms\":{},\"total_max_ms\":{},\"tls\":{},\"first_error\":{},\"results\":[",
        json_str(&o.urls.join(" ")),
        o.requests,
        workers,
        ok,
        o.requests - ok,
        bytes,
        num(wall),
        num(bytes as f64 / wall / 1e9),
        num(pct(&ttfb, 0.5)),
        num(ttfb.last().copied().unwrap_or(f64::NAN)),
        num(pct(&total, 0.5)),
        num(total.last().copied().unwrap_or(f64::NAN)),
        json_str(&tls),
        json_str(&first_error),
    ));
    for (i, r) in recs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"ok\":{},\"status\":{},\"bytes\":{},\"start_ms\":{},\"ttfb_head_ms\":{},\"ttfb_ms\":{},\"total_ms\":{},\"last_read_ms\":{},\"target\":{},\"error\":{}}}",
            r.ok,
            r.status,
            r.bytes,
            num(r.start_ms),
            num(r.ttfb_head_ms),
            num(r.ttfb_ms),
            num(r.total_ms),
            num(r.last_read_ms),
            r.target,
            json_str(&r.error)
        ));
    }
    out.push_str("]}");
    println!("{out}");
    if ok != o.requests {
        std::process::exit(1);
    }
}
