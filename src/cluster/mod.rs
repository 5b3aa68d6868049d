//! Several stowage nodes acting as one cache.
//!
//! Every cacheable key (a blob digest, a manifest digest, a tag as
//! upstream host, repository and tag) has one owner among the live nodes,
//! chosen by rendezvous hashing (`ring.rs`). A node with a miss for a key
//! it does not own asks the owner, in one hop: the request is an ordinary
//! registry request (`client.rs`) marked with the hop header, and a node
//! never forwards a request that carries it, so a loop is impossible
//! whatever the nodes' peer lists say. The asking node verifies what the
//! owner sends as it would verify upstream's answer and keeps a copy; so a
//! blob is fetched upstream once cluster-wide, by its owner, and a tag is
//! revalidated once per TTL cluster-wide.
//!
//! Peers that refuse connections or time out are marked down with backoff
//! and probed again (`peers.rs`); their keys fall to the next node in
//! rendezvous order, possibly this one, which then goes upstream itself.
//!
//! The peer path is never an open proxy: peer requests name a configured
//! upstream (`?ns=`, refused otherwise by the router like any request),
//! and with `secret_file` set a request carrying the hop header must carry
//! the secret too (compared in constant time), or it is refused (401
//! without it, 403 with a wrong one). A peer request with the right secret
//! is not asked for client credentials (htpasswd): the secret is the
//! peer's credential. Client certificates (mTLS) are checked at the TLS
//! handshake before any of this, so peers present `client_cert`.
//!
//! Files: `config.rs` (`[cluster]`), `ring.rs` (rendezvous), `peers.rs`
//! (the peer set and liveness), `client.rs` (requests to peers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;

pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod peers;
pub(crate) mod ring;

pub(crate) use client::{PeerClient, Unreachable};
pub(crate) use config::ClusterConfig;
pub(crate) use peers::{Peer, PeerSet};

use crate::error::{ConfigError, Error, ErrorKind, ErrorSource};
use crate::metrics::Metrics;
use crate::oci::headers::{X_STOWAGE_CLUSTER_SECRET, X_STOWAGE_HOP};
use crate::oci::{Digest, Tag};

/// Shortest secret accepted.
const MIN_SECRET: usize = 16;

/// At most this many peers are tried for one key before this node goes to
/// the store or upstream itself.
const MAX_PEERS_TRIED: usize = 2;

/// How often down peers are checked for a due probe.
const PROBE_TICK: Duration = Duration::from_millis(500);

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// A client (or anything, on a node that is not in a cluster).
    Client,
    /// Another node (the hop header): served here, never forwarded.
    /// `authenticated` when it carried the cluster secret, which then
    /// stands for client credentials.
    Peer {
        /// It carried the right cluster secret.
        authenticated: bool,
    },
}

impl Hop {
    /// A peer request?
    pub(crate) fn is_peer(self) -> bool {
        matches!(self, Hop::Peer { .. })
    }
}

/// The rendezvous key of a blob or a manifest by digest.
pub(crate) fn digest_key(digest: &Digest) -> Vec<u8> {
    digest.to_string().into_bytes()
}

/// The rendezvous key of a tag: upstream host, repository as upstream
/// names it, tag.
pub(crate) fn tag_key(host: &str, upstream_repo: &str, tag: &Tag) -> Vec<u8> {
    format!("tag:{host}/{upstream_repo}:{tag}").into_bytes()
}

/// This node's view of the cluster.
pub(crate) struct Cluster {
    peers: PeerSet,
    client: PeerClient,
    secret: Option<Vec<u8>>,
    metrics: Arc<Metrics>,
    /// `peers_dns`: host, port, scheme, interval.
    dns: Option<(String, u16, &'static str, Duration)>,
    /// Bound on a probe.
    probe_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.peers.me())
            .field("peers", &self.peers.all().len())
            .field("secret", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The cluster of `cfg` (validated), reading the secret file. `tls`:
    /// this node serves HTTPS (peers found by DNS are then `https://`).
    /// `headers_timeout` bounds the wait for a peer's response headers.
    pub(crate) fn new(
        cfg: &ClusterConfig,
        tls: bool,
        headers_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ConfigError> {
        cfg.validate()?;
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("cluster.{k}"), m);
        let advertise = cfg.advertise.as_deref().ok_or_else(|| {
            invalid(
                "advertise",
                "required: how the other nodes reach this one (--advertise URL)".into(),
            )
        })?;
        let me = config::normalize_url(advertise).map_err(|m| invalid("advertise", m))?;
        let secret = match &cfg.secret_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let s = text.trim_ascii().to_vec();
                if s.len() < MIN_SECRET {
                    return Err(invalid(
                        "secret_file",
                        format!("{} holds less than {MIN_SECRET} bytes", path.display()),
                    ));
                }
                Some(s)
            }
            None => None,
        };
        let client = PeerClient::new(cfg, &me, secret.as_deref(), headers_timeout)?;
        let urls = cfg
            .peers
            .iter()
            .map(|p| config::normalize_url(p).map_err(|m| invalid("peers", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let dns = match &cfg.peers_dns {
            Some(d) => {
                let (host, port) =
                    config::split_host_port(d).map_err(|m| invalid("peers_dns", m))?;
                let scheme = if tls { "https" } else { "http" };
                Some((host.to_string(), port, scheme, cfg.dns_interval))
            }
            None => None,
        };
        let cluster = Cluster {
            peers: PeerSet::new(me, urls),
            client,
            secret,
            metrics,
            dns,
            probe_timeout: cfg.connect_timeout * 2 + Duration::from_secs(1),
        };
        cluster.publish_counts();
        Ok(cluster)
    }

    /// The peer set.
    pub(crate) fn peers(&self) -> &PeerSet {
        &self.peers
    }

    /// The client for peer requests.
    pub(crate) fn client(&self) -> &PeerClient {
        &self.client
    }

    /// This node's metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Up to [`MAX_PEERS_TRIED`] live peers to ask for `key` before this
    /// node serves it itself, owner first; empty when this node owns it.
    pub(crate) fn ask_first(&self, key: &[u8]) -> Vec<Arc<Peer>> {
        let mut v = self.peers.before_me(key);
        v.truncate(MAX_PEERS_TRIED);
        v
    }

    /// Marks `peer` down for `why` (and updates the gauges).
    pub(crate) fn peer_failed(&self, peer: &Peer, why: &str) {
        peer.failed(why);
        self.publish_counts();
    }

    /// Marks `peer` up.
    pub(crate) fn peer_succeeded(&self, peer: &Peer) {
        if !peer.is_up() {
            peer.succeeded();
            self.publish_counts();
        }
    }

    fn publish_counts(&self) {
        let (up, down) = self.peers.counts();
        self.metrics.set_peers(up, down);
    }

    /// Who sent a request with these headers; a request carrying the hop
    /// header without the right secret (when one is configured) is refused.
    pub(crate) fn inbound(&self, headers: &HeaderMap) -> Result<Hop, Error> {
        let Some(hop) = headers.get(X_STOWAGE_HOP) else {
            return Ok(Hop::Client);
        };
        if hop.as_bytes() == self.peers.me().as_bytes() {
            // This node asked itself: its peer list names it under another
            // URL than `advertise`. Served, the request would join the very
            // fill that waits for it, until the peer timeout; refused, the
            // asking fill goes on to its next source at once.
            tracing::warn!(me = %self.peers.me(),
                "peer request from this node itself: the peer list names this node under \
                 another URL than advertise");
            return Err(Error::new(
                ErrorKind::Unavailable,
                ErrorSource::Client,
                "peer request from this node itself",
            ));
        }
        let Some(secret) = &self.secret else {
            self.metrics.peer_request_received(true);
            return Ok(Hop::Peer {
                authenticated: false,
            });
        };
        let from = headers
            .get(X_STOWAGE_HOP)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string();
        let refuse = |kind, message: &str| {
            self.metrics.peer_request_received(false);
            tracing::warn!(%from, "peer request refused: {message}");
            Err(Error::new(kind, ErrorSource::Client, message))
        };
        match headers.get(X_STOWAGE_CLUSTER_SECRET) {
            None => refuse(
                ErrorKind::Unauthorized {
                    challenge: HeaderValue::from_static("StowageCluster realm=\"stowage\""),
                },
                "peer request without the cluster secret",
            ),
            Some(v) if bool::from(v.as_bytes().ct_eq(secret)) => {
                self.metrics.peer_request_received(true);
                Ok(Hop::Peer {
                    authenticated: true,
                })
            }
            Some(_) => refuse(
                ErrorKind::Denied,
                "peer request with a wrong cluster secret",
            ),
        }
    }

    /// A line for `/readyz`: the peers up and down.
    pub(crate) fn status(&self) -> String {
        let all = self.peers.all();
        let down: Vec<&str> = all.iter().filter(|p| !p.is_up()).map(|p| p.url()).collect();
        let mut s = format!(
            "cluster: {} node(s), this one {}",
            all.len(),
            self.peers.me()
        );
        if !down.is_empty() {
            s.push_str(&format!(", down: {}", down.join(" ")));
        }
        s
    }

    /// Starts the prober (and the DNS resolver with `peers_dns`); both stop
    /// when `stop` is cancelled.
    pub(crate) fn spawn(self: &Arc<Self>, stop: &CancellationToken) {
        let me = self.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            let mut tick = tokio::time::interval(PROBE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.probe_due().await;
            }
        }));
        if let Some((host, port, scheme, every)) = self.dns.clone() {
            let me = self.clone();
            tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    me.resolve(&host, port, scheme).await;
                }
            }));
        }
    }

    /// Probes every down peer whose backoff has passed.
    async fn probe_due(&self) {
        let now = Instant::now();
        let due: Vec<Arc<Peer>> = self
            .peers
            .all()
            .iter()
            .filter(|p| p.probe_due(now))
            .cloned()
            .collect();
        let probes = due.iter().map(|p| async move {
            let r = tokio::time::timeout(self.probe_timeout, self.client.probe(p)).await;
            let r = r.unwrap_or_else(|_| Err(Unreachable("probe timed out".into())));
            self.metrics.peer_request(
                crate::metrics::PeerKind::Probe,
                if r.is_ok() {
                    crate::metrics::PeerResult::Ok
                } else {
                    crate::metrics::PeerResult::Unreachable
                },
            );
            match r {
                Ok(()) => self.peer_succeeded(p),
                Err(e) => self.peer_failed(p, &e.0),
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// Resolves `peers_dns` and replaces the peer list (kept as it was when
    /// resolution fails or finds nobody).
    async fn resolve(&self, host: &str, port: u16, scheme: &str) {
        match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => {
                let urls: Vec<String> = addrs
                    .map(|a: SocketAddr| match a {
                        SocketAddr::V4(v4) => format!("{scheme}://{}:{port}", v4.ip()),
                        SocketAddr::V6(v6) => format!("{scheme}://[{}]:{port}", v6.ip()),
                    })
                    .collect();
                if urls.is_empty() {
                    tracing::warn!(%host, "peers_dns resolved to no address; keeping the peer list");
                    return;
                }
                if self.peers.replace(urls) {
                    let all: Vec<String> = self
                        .peers
                        .all()
                        .iter()
                        .map(|p| p.url().to_string())
                        .collect();
                    tracing::info!(peers = %all.join(" "), "cluster peers changed");
                    self.publish_counts();
                }
            }
            Err(e) => {
                tracing::warn!(%host, error = %e, "resolving peers_dns failed; keeping the peer list")
            }
        }
    }
}
