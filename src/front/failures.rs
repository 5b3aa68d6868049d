//! Failed logins ([`super::access`]): a wrong `Authorization` value is
//! remembered briefly so that repeating it costs no bcrypt, each client
//! address gets a burst of failures before it is answered 429 with
//! `Retry-After` for the rest of the window, and failures are logged at
//! most once per address per interval (with the count of those not
//! logged).
//!
//! A client is an IPv4 address or an IPv6 /64. Each also has a lane ([`Failures::lane`]): one password check
//! at a time per address, so one address flooding cannot fill the bcrypt
//! pool's queue ahead of everyone else.
//!
//! The maps are moka caches with a capacity, so a flood from many
//! addresses cannot grow them without bound.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a failed `Authorization` value is answered 401 without bcrypt.
const REMEMBER_FAILED: Duration = Duration::from_secs(60);
/// How many failed values are remembered.
const FAILED_CAPACITY: u64 = 10_000;
/// How many client addresses are tracked.
const ADDR_CAPACITY: u64 = 100_000;
/// At most one failure warning per address per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Failures of one client address.
#[derive(Debug)]
struct AddrState {
    /// Start of the current counting window.
    window_start: Instant,
    /// Failures in it.
    count: u32,
    /// Refused (429) until then.
    blocked_until: Option<Instant>,
    /// When a failure of this address was last logged.
    last_warning: Option<Instant>,
    /// Failures since that warning.
    unlogged: u64,
}

/// What to log about a failure just recorded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Warning {
    /// Failures of this address not logged before this one.
    pub(crate) unlogged: u64,
    /// Whether the address is now refused.
    pub(crate) blocked: bool,
}

/// Recent failures: by `Authorization` value and by client address.
pub(crate) struct Failures {
    failed: moka::sync::Cache<[u8; 32], ()>,
    by_addr: moka::sync::Cache<IpAddr, Arc<Mutex<AddrState>>>,
    lanes: moka::sync::Cache<IpAddr, Arc<tokio::sync::Semaphore>>,
    /// Failures an address may have per window before it is refused.
    limit: u32,
    window: Duration,
}

impl Failures {
    /// `limit` failures per address per `window`.
    pub(crate) fn new(limit: u32, window: Duration) -> Failures {
        Failures {
            failed: moka::sync::Cache::builder()
                .max_capacity(FAILED_CAPACITY)
                .time_to_live(REMEMBER_FAILED)
                .build(),
            by_addr: moka::sync::Cache::builder()
                .max_capacity(ADDR_CAPACITY)
                .time_to_idle(window.max(WARN_INTERVAL) * 2)
                .build(),
            lanes: moka::sync::Cache::builder()
                .max_capacity(ADDR_CAPACITY)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            limit: limit.max(1),
            window,
        }
    }

    /// The lane of `addr`: a semaphore of one permit that a password check
    /// from that address holds while it waits for and runs bcrypt.
    pub(crate) fn lane(&self, addr: IpAddr) -> Arc<tokio::sync::Semaphore> {
        self.lanes
            .get_with(client(addr), || Arc::new(tokio::sync::Semaphore::new(1)))
    }

    /// Forgets every remembered value (the users changed).
    pub(crate) fn forget_values(&self) {
        self.failed.invalidate_all();
    }

    /// How long `addr` is still refused, if it is.
    pub(crate) fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        let state = self.by_addr.get(&client(addr))?;
        let s = lock(&state);
        let until = s.blocked_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Whether this value failed recently.
    pub(crate) fn known_bad(&self, key: &[u8; 32]) -> bool {
        self.failed.contains_key(key)
    }

    /// Records a failure of `key` from `addr`; `Some` when it should be
    /// logged.
    pub(crate) fn record(&self, addr: IpAddr, key: [u8; 32]) -> Option<Warning> {
        self.failed.insert(key, ());
        let now = Instant::now();
        let state = self.by_addr.get_with(client(addr), || {
            Arc::new(Mutex::new(AddrState {
                window_start: now,
                count: 0,
                blocked_until: None,
                last_warning: None,
                unlogged: 0,
            }))
        });
        let mut s = lock(&state);
        if now.duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.count = 0;
        }
        s.count = s.count.saturating_add(1);
        let newly_blocked = s.count >= self.limit && s.blocked_until.is_none_or(|t| t <= now);
        if newly_blocked {
            s.blocked_until = Some(now + self.window);
        }
        let due = s
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL);
        if due || newly_blocked {
            let unlogged = s.unlogged;
            s.last_warning = Some(now);
            s.unlogged = 0;
            Some(Warning {
                unlogged,
                blocked: newly_blocked,
            })
        } else {
            s.unlogged += 1;
            None
        }
    }
}

/// What counts as one client: an IPv4 address (also when mapped into
/// IPv6), or an IPv6 /64 (one host usually has a whole /64 to pick
/// addresses from).
fn client(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

fn lock(m: &Mutex<AddrState>) -> std::sync::MutexGuard<'_, AddrState> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_blocks_the_address_for_the_window_and_warns_sparingly() {
        let f = Failures::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let key = |n: u8| [n; 32];
        assert_eq!(
            f.record(a, key(1)),
            Some(Warning {
                unlogged: 0,
                blocked: false
            })
        );
        assert!(f.known_bad(&key(1)));
        assert!(!f.known_bad(&key(2)));
        assert_eq!(f.record(a, key(2)), None, "one warning per interval");
        assert!(f.blocked(a).is_none());
        assert_eq!(
            f.record(a, key(3)),
            Some(Warning {
                unlogged: 1,
                blocked: true
            }),
            "blocking is always logged"
        );
        let left = f.blocked(a).expect("blocked after 3 failures");
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
        assert!(f.blocked(b).is_none(), "other addresses are not");
        assert_eq!(f.record(a, key(4)), None);
        f.forget_values();
        assert!(!f.known_bad(&key(1)));
    }

    #[test]
    fn ipv6_clients_are_their_64_prefix() {
        let f = Failures::new(1, Duration::from_secs(60));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        f.record(a, [0; 32]);
        let same: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(f.blocked(same).is_some(), "same /64");
        assert!(f.blocked(other).is_none(), "another /64");
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        f.record(v4, [1; 32]);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(
            f.blocked(mapped).is_some(),
            "IPv4-mapped is the IPv4 address"
        );
    }
}
