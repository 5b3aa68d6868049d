//! The peer set: every node of the cluster (this one included) with its
//! liveness.
//!
//! A peer that refuses a connection, times out or sends bytes that fail
//! verification is marked down for a backoff that doubles with each failure
//! in a row (1 s, 2 s, 4 s, ... 30 s at most); once the backoff has passed,
//! the prober sends it `GET /v2/` and a success (or any successful request)
//! marks it up again. Keys of a down peer fall to the next node in their
//! rendezvous order. This node is never marked down in its own set.
//!
//! The list is an `ArcSwap`: lookups on the miss path take no lock but the
//! per-peer liveness mutex, held for a few instructions. With `peers_dns`
//! the list is replaced on every resolution; peers that stay keep their
//! liveness.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::ring;

/// First backoff after a failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// Longest backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Whether a peer is up, and when a down peer is probed again. Pure: the
/// caller says what time it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Liveness {
    /// Failures in a row.
    failures: u32,
    /// Down until a probe succeeds; probed once this instant has passed.
    down_until: Option<Instant>,
}

impl Liveness {
    /// Up?
    pub(crate) fn is_up(&self) -> bool {
        self.down_until.is_none()
    }

    /// Down, and its backoff has passed: time to probe.
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| now >= t)
    }

    /// One more failure at `now`: down for the next backoff. Returns the
    /// backoff. Failures while the peer is down and not yet due for a probe
    /// are the same outage (requests that were in flight when it went
    /// down): they leave the backoff as it is.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        if let Some(until) = self.down_until
            && now < until
        {
            return until - now;
        }
        self.failures = self.failures.saturating_add(1);
        let backoff = BACKOFF_BASE
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(BACKOFF_MAX);
        self.down_until = Some(now + backoff);
        backoff
    }

    /// A success: up, backoff reset.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.down_until = None;
    }
}

/// One node of the cluster as this node sees it.
#[derive(Debug)]
pub(crate) struct Peer {
    /// Normalized URL (`http://10.0.0.2:5000`).
    url: String,
    /// Whether this is the node itself.
    me: bool,
    live: Mutex<Liveness>,
}

impl Peer {
    fn new(url: String, me: bool) -> Peer {
        Peer {
            url,
            me,
            live: Mutex::new(Liveness::default()),
        }
    }

    /// Its normalized URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Whether this peer is this node.
    #[cfg(test)]
    pub(crate) fn is_me(&self) -> bool {
        self.me
    }

    fn with<T>(&self, f: impl FnOnce(&mut Liveness) -> T) -> T {
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut l)
    }

    /// Up (never down for this node itself)?
    pub(crate) fn is_up(&self) -> bool {
        self.me || self.with(|l| l.is_up())
    }

    /// Down and due for a probe.
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        !self.me && self.with(|l| l.probe_due(now))
    }

    /// Marks the peer down (again) for `why`.
    pub(crate) fn failed(&self, why: &str) {
        if self.me {
            return;
        }
        let (was_up, backoff) = self.with(|l| (l.is_up(), l.failed(Instant::now())));
        if was_up {
            tracing::warn!(peer = %self.url, %why, "peer marked down");
        } else {
            tracing::debug!(peer = %self.url, %why, retry_in = ?backoff, "peer still down");
        }
    }

    /// Marks the peer up.
    pub(crate) fn succeeded(&self) {
        let was_down = self.with(|l| {
            let was = !l.is_up();
            l.succeeded();
            was
        });
        if was_down {
            tracing::info!(peer = %self.url, "peer is up again");
        }
    }
}

/// Every node of the cluster, this one included.
pub(crate) struct PeerSet {
    me: String,
    peers: ArcSwap<Vec<Arc<Peer>>>,
}

impl PeerSet {
    /// The set of `urls` (normalized) plus `me` (normalized), which is
    /// added when missing.
    pub(crate) fn new(me: String, urls: Vec<String>) -> PeerSet {
        let set = PeerSet {
            me,
            peers: ArcSwap::from_pointee(Vec::new()),
        };
        set.replace(urls);
        set
    }

    /// This node's URL.
    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    /// Every node now, this one included.
    pub(crate) fn all(&self) -> Arc<Vec<Arc<Peer>>> {
        self.peers.load_full()
    }

    /// Replaces the list with `urls` (plus this node), keeping the
    /// liveness of peers that stay. Returns whether the list changed.
    pub(crate) fn replace(&self, mut urls: Vec<String>) -> bool {
        if !urls.contains(&self.me) {
            urls.push(self.me.clone());
        }
        urls.sort();
        urls.dedup();
        let old = self.peers.load_full();
        if old.len() == urls.len() && old.iter().zip(&urls).all(|(p, u)| p.url == *u) {
            return false;
        }
        let new: Vec<Arc<Peer>> = urls
            .into_iter()
            .map(|u| {
                old.iter().find(|p| p.url == u).cloned().unwrap_or_else(|| {
                    let me = u == self.me;
                    Arc::new(Peer::new(u, me))
                })
            })
            .collect();
        self.peers.store(Arc::new(new));
        true
    }

    /// The nodes to ask for `key` before this one: those ranked above it
    /// that are up, owner first. Empty when this node owns the key (or
    /// every node ranked above it is down).
    pub(crate) fn before_me(&self, key: &[u8]) -> Vec<Arc<Peer>> {
        let all = self.peers.load();
        ring::rank(&all, key, |p| p.url.as_str())
            .into_iter()
            .take_while(|p| !p.me)
            .filter(|p| p.is_up())
            .cloned()
            .collect()
    }

    /// The owner of `key` among all nodes, up or down.
    #[cfg(test)]
    pub(crate) fn owner(&self, key: &[u8]) -> Option<Arc<Peer>> {
        let all = self.peers.load();
        ring::rank(&all, key, |p| p.url.as_str())
            .first()
            .map(|p| (*p).clone())
    }

    /// (up, down) counts of the other nodes.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let all = self.peers.load();
        let up = all.iter().filter(|p| !p.me && p.is_up()).count();
        let others = all.iter().filter(|p| !p.me).count();
        (up, others - up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        assert!(l.is_up() && !l.probe_due(t0));
        // Each failed probe (once the backoff has passed) doubles it.
        let mut seen = Vec::new();
        let mut t = t0;
        for _ in 0..8 {
            let backoff = l.failed(t);
            seen.push(backoff.as_secs());
            t += backoff;
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(!l.is_up());
        assert!(!l.probe_due(t - Duration::from_secs(1)));
        assert!(l.probe_due(t));
        l.succeeded();
        assert!(l.is_up());
        assert_eq!(l.failed(t0), Duration::from_secs(1), "reset after success");
        assert!(l.probe_due(t0 + Duration::from_secs(1)));
    }

    /// Requests in flight when a peer goes down all fail at about the same
    /// time: one outage, one backoff (ten of them made it 30 s).
    #[test]
    fn failures_at_once_do_not_stack_the_backoff() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        for i in 0..10 {
            l.failed(t0 + Duration::from_millis(i * 10));
        }
        assert!(!l.probe_due(t0 + Duration::from_millis(900)));
        assert!(l.probe_due(t0 + Duration::from_secs(1)));
        // The probe fails: the next backoff doubles.
        assert_eq!(
            l.failed(t0 + Duration::from_secs(1)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn down_peers_are_skipped_and_keys_fall_to_the_next() {
        let urls: Vec<String> = (1..=3).map(|i| format!("http://n{i}:1")).collect();
        let set = PeerSet::new("http://n1:1".into(), urls.clone());
        assert_eq!(set.all().len(), 3);
        // A key another node owns: this node asks it first.
        let key = (0..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| {
                let r = ring::rank(&urls, k, |s| s.as_str());
                r[0] != "http://n1:1" && r[1] != "http://n1:1"
            })
            .unwrap();
        let before = set.before_me(&key);
        assert_eq!(before.len(), 2, "both others rank above this node");
        let owner = set.owner(&key).unwrap();
        assert_eq!(before[0].url(), owner.url());
        owner.failed("test");
        let now = set.before_me(&key);
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].url(), owner.url(), "the down owner is skipped");
        assert_eq!(set.counts(), (1, 1));
        owner.succeeded();
        assert_eq!(set.before_me(&key)[0].url(), owner.url());
        // This node is never down, and owns what it ranks first.
        let me = set.all().iter().find(|p| p.is_me()).unwrap().clone();
        me.failed("ignored");
        assert!(me.is_up());
    }

    #[test]
    fn replacing_keeps_liveness() {
        let set = PeerSet::new("http://a:1".into(), vec!["http://b:1".into()]);
        let b = set
            .all()
            .iter()
            .find(|p| p.url() == "http://b:1")
            .unwrap()
            .clone();
        b.failed("test");
        assert!(set.replace(vec!["http://b:1".into(), "http://c:1".into()]));
        assert!(!set.replace(vec![
            "http://c:1".into(),
            "http://b:1".into(),
            "http://a:1".into()
        ]));
        let b2 = set
            .all()
            .iter()
            .find(|p| p.url() == "http://b:1")
            .unwrap()
            .clone();
        assert!(Arc::ptr_eq(&b, &b2));
        assert!(!b2.is_up());
        assert_eq!(set.all().len(), 3);
    }
}
