//! bench-shaper: a distant registry on loopback, for `bench/run.sh`.
//!
//! A TCP proxy in front of the loopback upstream that makes it look far away:
//!
//! * **latency**: every byte is delivered `--rtt-ms / 2` after it was sent,
//!   in each direction; a new connection can carry data only one RTT after
//!   it was accepted (the TCP handshake a real distant peer costs), so the
//!   first request on a connection arrives 1.5 RTT after `connect`;
//! * **bandwidth**: each direction of each connection is paced at
//!   `--rate-mibps` (MiB/s), independently of every other connection (a
//!   per-connection limit, as seen from a far-away CDN or registry);
//! * **slow start**: unless `--init-cwnd 0`, a sender has at most `cwnd`
//!   bytes in flight (sent but not yet acknowledged, an acknowledgement
//!   taking one RTT); `cwnd` starts at `--init-cwnd` segments of 1448 bytes,
//!   grows by every acknowledged byte (doubling per RTT, as in TCP slow
//!   start) up to twice the bandwidth-delay product, and falls back to its
//!   initial value after an idle period longer than RTT + 200 ms (Linux's
//!   `tcp_slow_start_after_idle`). No losses, so no congestion avoidance.
//!
//! Clients such as skopeo first try HTTPS on a registry they were told is
//! insecure and fall back to plain HTTP when that fails. The upstream here
//! is plain HTTP; a connection whose first byte is a TLS handshake record
//! (0x16) is closed at once (`--tls-probes refuse`, the default), so that a
//! direct pull does not pay for its probe the round trips a mirror in front
//! never pays (a real distant registry speaks TLS instead, and costs every
//! new connection one more round trip for the handshake: neither side pays
//! that here, which favours the direct pull).
//!
//! Timing is done with tokio timers (1 ms resolution) against absolute
//! deadlines, so pacing errors do not accumulate. Memory is bounded per
//! connection: at most `CHANNEL_CHUNKS` chunks of `CHUNK` bytes are queued per
//! direction, and with slow start at most `cwnd` bytes are in flight.
//!
//! Usage: bench-shaper --listen ADDR --upstream ADDR [--rtt-ms 100]
//!        [--rate-mibps 16] [--init-cwnd 10] [--tls-probes refuse|pass]
//!
//! Prints `listening ADDR` on stdout once bound (`--listen 127.0.0.1:0` picks
//! a port), and one line per connection on stderr: `open N`, `tls-probe N`
//! (refused), `close N up BYTES down BYTES SECS`.
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

/// Bytes read from a socket at a time; pacing works at this granularity
/// (1 ms at 16 MiB/s).
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction (4 MiB), more than the bandwidth-delay product
/// at the default settings (1.6 MiB), so the queue never limits throughput.
const CHANNEL_CHUNKS: usize = 256;
/// A TCP segment's payload.
const MSS: usize = 1448;

struct Shape {
    one_way: Duration,
    rtt: Duration,
    /// Bytes per second, per direction of each connection.
    rate: f64,
    /// Initial congestion window in bytes; 0 disables slow start.
    init_cwnd: usize,
    max_cwnd: usize,
    /// Idle time after which the window restarts from `init_cwnd`.
    idle_restart: Duration,
    refuse_tls: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-shaper --listen ADDR --upstream ADDR [--rtt-ms 100] [--rate-mibps 16]\n\
         \x20      [--init-cwnd SEGMENTS (10; 0 = no slow start)] [--tls-probes refuse|pass]"
    );
    std::process::exit(2)
}

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut upstream: Option<SocketAddr> = None;
    let (mut rtt_ms, mut rate_mibps, mut init_segments) = (100.0f64, 16.0f64, 10usize);
    let mut refuse_tls = true;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--listen" => listen = Some(val().parse().unwrap_or_else(|_| usage())),
            "--upstream" => upstream = Some(val().parse().unwrap_or_else(|_| usage())),
            "--rtt-ms" => rtt_ms = val().parse().unwrap_or_else(|_| usage()),
            "--rate-mibps" => rate_mibps = val().parse().unwrap_or_else(|_| usage()),
            "--init-cwnd" => init_segments = val().parse().unwrap_or_else(|_| usage()),
            "--tls-probes" => {
                refuse_tls = match val().as_str() {
                    "refuse" => true,
                    "pass" => false,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        usage()
    };
    if !(rtt_ms >= 0.0 && rate_mibps > 0.0) {
        usage()
    }
    let rtt = Duration::from_secs_f64(rtt_ms / 1000.0);
    let rate = rate_mibps * 1024.0 * 1024.0;
    let bdp = (rate * rtt.as_secs_f64()) as usize;
    let shape = Arc::new(Shape {
        one_way: rtt / 2,
        rtt,
        rate,
        init_cwnd: init_segments * MSS,
        max_cwnd: (2 * bdp).max(64 * 1024),
        idle_restart: rtt + Duration::from_millis(200),
        refuse_tls,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(listen, upstream, shape));
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, shape: Arc<Shape>) {
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        eprintln!("bench-shaper: bind {listen}: {e}");
        std::process::exit(1)
    });
    let addr = listener.local_addr().expect("local address");
    println!("listening {addr}");
    std::io::stdout().flush().ok();
    let ids = AtomicU64::new(0);
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let shape = shape.clone();
        tokio::spawn(async move { connection(id, client, upstream, shape).await });
    }
}

async fn connection(id: u64, client: TcpStream, upstream: SocketAddr, shape: Arc<Shape>) {
    let accepted = Instant::now();
    client.set_nodelay(true).ok();
    // HTTP clients speak first: look at the first byte before going upstream.
    let mut first = [0u8; 1];
    match client.peek(&mut first).await {
        Ok(0) | Err(_) => return, // closed without a request
        Ok(_) => {}
    }
    if shape.refuse_tls && first[0] == 0x16 {
        eprintln!("tls-probe {id}");
        return; // dropping the socket closes it
    }
    let up = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("upstream-error {id} {e}");
            return;
        }
    };
    up.set_nodelay(true).ok();
    eprintln!("open {id}");
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    // Client to upstream: nothing can arrive before the handshake is done.
    let c2s = tokio::spawn(pipe(cr, uw, shape.clone(), accepted + shape.rtt));
    let down_bytes = pipe(ur, cw, shape.clone(), accepted).await;
    let up_bytes = c2s.await.unwrap_or(0);
    eprintln!(
        "close {id} up {up_bytes} down {down_bytes} {:.3}",
        accepted.elapsed().as_secs_f64()
    );
}

/// Copies `src` to `dst`, each chunk delivered at the time the shape says.
/// Returns the bytes copied. Ends at EOF of `src` (then shuts `dst` down) or
/// at an error on either side.
async fn pipe(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    sh: Arc<Shape>,
    not_before: Instant,
) -> u64 {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHANNEL_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((at, buf)) = rx.recv().await {
            sleep_until(at).await;
            if dst.write_all(&buf).await.is_err() {
                return; // dropping rx stops the reader
            }
        }
        dst.shutdown().await.ok();
    });
    let reader = async move {
        let slow_start = sh.init_cwnd > 0;
        let mut cwnd = sh.init_cwnd;
        // (acknowledged at, bytes) of what is in flight, oldest first.
        let mut inflight: VecDeque<(Instant, usize)> = VecDeque::new();
        let mut inflight_bytes = 0usize;
        let mut link_free = Instant::now();
        let mut last_send: Option<Instant> = None;
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match src.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            if slow_start {
                let mut now = Instant::now();
                if inflight.is_empty()
                    && last_send.is_some_and(|t| now.saturating_duration_since(t) > sh.idle_restart)
                {
                    cwnd = sh.init_cwnd;
                }
                loop {
                    while let Some(&(acked, len)) = inflight.front() {
                        if acked > now {
                            break;
                        }
                        inflight.pop_front();
                        inflight_bytes -= len;
                        cwnd = (cwnd + len).min(sh.max_cwnd);
                    }
                    // Always let one chunk go when nothing is in flight.
                    if inflight_bytes == 0 || inflight_bytes + n <= cwnd {
                        break;
                    }
                    let next = inflight.front().expect("in flight").0;
                    sleep_until(next).await;
                    now = Instant::now();
                }
            }
            let depart = Instant::now().max(link_free).max(not_before);
            link_free = depart + Duration::from_secs_f64(n as f64 / sh.rate);
            let deliver = link_free + sh.one_way;
            if slow_start {
                inflight.push_back((deliver + sh.one_way, n));
                inflight_bytes += n;
            }
            last_send = Some(depart);
            total += n as u64;
            if tx.send((deliver, buf)).await.is_err() {
                break;
            }
        }
        total
    };
    let total = reader.await;
    writer.await.ok();
    total
}
