//! Client authentication for the mirror itself: HTTP Basic credentials
//! checked against an htpasswd file of bcrypt entries.
//!
//! When enabled every request needs credentials, `/v2/` included: that is
//! where Docker, containerd and podman learn that a registry wants a login
//! (`401` with `WWW-Authenticate: Basic realm="..."`), after which they send
//! `Authorization: Basic ...` on every request.
//!
//! bcrypt is slow on purpose (tens of milliseconds), so a verified
//! `Authorization` value is remembered for a while (keyed by a SHA-256 of the
//! value and the htpasswd generation, so a reload forgets everything), a
//! failed one briefly, and each client address gets a burst of failures
//! before it is answered 429 ([`super::failures`]). Verifications run on
//! tokio's blocking pool, never on a runtime worker, at most
//! [`bcrypt_threads`] at once: the permit travels into the blocking task,
//! so a client that hangs up does not free a slot while its bcrypt still
//! runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use http::{HeaderMap, HeaderValue, header};
use sha2::{Digest as _, Sha256};

use super::config::AccessConfig;
use super::failures::Failures;
use crate::error::Error;

/// How long a verified `Authorization` value is trusted without running
/// bcrypt again.
const VERIFIED_TTL: Duration = Duration::from_secs(600);
/// How many verified values are remembered.
const VERIFIED_CAPACITY: u64 = 10_000;

/// Why an htpasswd file was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AccessError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A line is not a `user:bcrypt-hash` entry.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// The highest bcrypt cost accepted. Each step doubles the work: cost 12
/// takes about 250 ms per check on one core, 17 (htpasswd's maximum) eight
/// seconds, 31 days. An entry above this would turn every login into a
/// denial of service on the bcrypt pool, so the file is refused instead.
pub(crate) const MAX_BCRYPT_COST: u32 = 12;

/// Users and their bcrypt hashes, as read from one version of the file.
#[derive(Debug)]
pub(crate) struct Htpasswd {
    users: HashMap<String, String>,
    /// The highest cost in the file.
    max_cost: u32,
    /// A hash of an unguessable password at `max_cost`, checked for
    /// unknown users so that they take as long as known ones; computed on
    /// the first check of an unknown user (on the bcrypt pool), not while
    /// parsing.
    dummy: std::sync::OnceLock<String>,
}

impl Htpasswd {
    /// Parses htpasswd text: `user:hash` lines, `#` comments and blank lines
    /// allowed; only bcrypt hashes (`$2y$`, `$2b$`, `$2a$`, `$2x$`).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Htpasswd, AccessError> {
        let bad = |line: usize, message: String| AccessError::Invalid {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut users = HashMap::new();
        let mut max_cost = 4;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(bad(i + 1, "expected user:hash".into()));
            };
            if user.is_empty() {
                return Err(bad(i + 1, "empty user name".into()));
            }
            let parts = bcrypt::HashParts::from_str(hash).map_err(|_| {
                bad(
                    i + 1,
                    format!(
                        "the entry for {user:?} is not a bcrypt hash; only bcrypt is \
                         supported (create it with `htpasswd -B`)"
                    ),
                )
            })?;
            if parts.get_cost() > MAX_BCRYPT_COST {
                return Err(bad(
                    i + 1,
                    format!(
                        "the entry for {user:?} has bcrypt cost {}, above the {MAX_BCRYPT_COST} \
                         accepted (each check would take seconds or more); recreate it with \
                         `htpasswd -B -C 10`",
                        parts.get_cost()
                    ),
                ));
            }
            max_cost = max_cost.max(parts.get_cost());
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(bad(i + 1, format!("user {user:?} appears twice")));
            }
        }
        if users.is_empty() {
            return Err(bad(0, "no users in the file".into()));
        }
        Ok(Htpasswd {
            users,
            max_cost,
            dummy: std::sync::OnceLock::new(),
        })
    }

    /// Number of users.
    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }

    /// Checks a password (slow: bcrypt). Unknown users take as long as known
    /// ones.
    pub(crate) fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                // Its password never matters: unknown users are refused
                // anyway.
                let dummy = self.dummy.get_or_init(|| {
                    bcrypt::hash("stowage: no such user", self.max_cost).unwrap_or_default()
                });
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }
}

/// The mirror's access control: open, or htpasswd-protected.
pub(crate) struct Access {
    inner: Option<Protected>,
}

struct Protected {
    path: PathBuf,
    reload_interval: Duration,
    challenge: HeaderValue,
    users: ArcSwap<Htpasswd>,
    /// Bumped at every reload; part of the verified-cache key.
    generation: AtomicU64,
    /// SHA-256 of the file contents last tried (loaded or rejected).
    seen: ArcSwap<[u8; 32]>,
    verified: moka::sync::Cache<[u8; 32], ()>,
    failures: Failures,
    bcrypt_slots: Arc<tokio::sync::Semaphore>,
}

/// How many bcrypt verifications run at once: half the cores (at least
/// one), so a flood of wrong passwords leaves the other half to serving.
pub(crate) fn bcrypt_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cores / 2).max(1)
}

impl Access {
    /// No authentication: every request is let through.
    pub(crate) fn open() -> Access {
        Access { inner: None }
    }

    /// From the `[access]` configuration (open when `None`); reads the
    /// htpasswd file.
    pub(crate) fn new(config: Option<&AccessConfig>) -> Result<Access, AccessError> {
        let Some(config) = config else {
            return Ok(Access::open());
        };
        let bytes = std::fs::read(&config.htpasswd).map_err(|source| AccessError::Read {
            path: config.htpasswd.clone(),
            source,
        })?;
        let users = Htpasswd::parse(&config.htpasswd, &String::from_utf8_lossy(&bytes))?;
        tracing::info!(
            htpasswd = %config.htpasswd.display(),
            users = users.len(),
            "client authentication enabled"
        );
        let challenge = HeaderValue::from_str(&format!("Basic realm=\"{}\"", config.realm))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic realm=\"stowage\""));
        Ok(Access {
            inner: Some(Protected {
                path: config.htpasswd.clone(),
                reload_interval: config.reload_interval,
                challenge,
                users: ArcSwap::from_pointee(users),
                generation: AtomicU64::new(0),
                seen: ArcSwap::from_pointee(Sha256::digest(&bytes).into()),
                verified: moka::sync::Cache::builder()
                    .max_capacity(VERIFIED_CAPACITY)
                    .time_to_live(VERIFIED_TTL)
                    .build(),
                failures: Failures::new(config.max_failures, config.failure_window),
                bcrypt_slots: Arc::new(tokio::sync::Semaphore::new(bcrypt_threads())),
            }),
        })
    }

    /// Whether requests need credentials.
    pub(crate) fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// How often the htpasswd file should be polled (`None`: no file).
    pub(crate) fn reload_interval(&self) -> Option<Duration> {
        self.inner.as_ref().map(|p| p.reload_interval)
    }

    /// Lets the request from `peer` through, or answers 401 UNAUTHORIZED
    /// with the Basic challenge, or 429 TOOMANYREQUESTS with `Retry-After`
    /// when `peer` has failed too often.
    pub(crate) async fn check(&self, headers: &HeaderMap, peer: IpAddr) -> Result<(), Error> {
        let Some(p) = &self.inner else {
            return Ok(());
        };
        let deny = |message: &str| Error::unauthorized(message, p.challenge.clone());
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(deny("authentication required"));
        };
        let Some((user, password)) = parse_basic(value) else {
            return Err(deny(
                "authentication required: HTTP Basic credentials expected",
            ));
        };
        let generation = p.generation.load(Ordering::Acquire);
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update(generation.to_le_bytes());
            h.update(value.as_bytes());
            h.finalize().into()
        };
        if p.verified.contains_key(&key) {
            return Ok(());
        }
        p.refuse_if_blocked(peer)?;
        if p.failures.known_bad(&key) {
            p.failed(peer, key, &user);
            return Err(deny("invalid username or password"));
        }
        // One check at a time per address, then a slot of the pool.
        let Ok(lane) = p.failures.lane(peer).acquire_owned().await else {
            return Err(deny("invalid username or password"));
        };
        let Ok(slot) = p.bcrypt_slots.clone().acquire_owned().await else {
            return Err(deny("invalid username or password"));
        };
        // While this one queued, the same value may have been checked, or
        // the address refused.
        if p.verified.contains_key(&key) {
            return Ok(());
        }
        p.refuse_if_blocked(peer)?;
        if p.failures.known_bad(&key) {
            p.failed(peer, key, &user);
            return Err(deny("invalid username or password"));
        }
        let users = p.users.load_full();
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let _held = (lane, slot);
            users.verify(&check_user, &password)
        })
        .await
        .unwrap_or(false);
        if ok {
            p.verified.insert(key, ());
            Ok(())
        } else {
            p.failed(peer, key, &user);
            Err(deny("invalid username or password"))
        }
    }

    /// Re-reads the htpasswd file. With `force` false nothing happens unless
    /// its contents changed since the last attempt. A file that does not
    /// parse is logged and the previous users stay. Returns whether new users
    /// are in effect.
    pub(crate) fn reload(&self, force: bool) -> Result<bool, AccessError> {
        let Some(p) = &self.inner else {
            return Ok(false);
        };
        let bytes = match std::fs::read(&p.path) {
            Ok(b) => b,
            Err(source) => {
                let digest: [u8; 32] =
                    Sha256::digest(format!("unreadable: {:?}", source.kind())).into();
                let report = force || **p.seen.load() != digest;
                p.seen.store(Arc::new(digest));
                let e = AccessError::Read {
                    path: p.path.clone(),
                    source,
                };
                if report {
                    tracing::error!(error = %e, "htpasswd reload rejected; keeping the previous users");
                    return Err(e);
                }
                return Ok(false);
            }
        };
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && **p.seen.load() == digest {
            return Ok(false);
        }
        p.seen.store(Arc::new(digest));
        match Htpasswd::parse(&p.path, &String::from_utf8_lossy(&bytes)) {
            Ok(users) => {
                tracing::info!(htpasswd = %p.path.display(), users = users.len(), "htpasswd reloaded");
                p.users.store(Arc::new(users));
                p.generation.fetch_add(1, Ordering::AcqRel);
                p.verified.invalidate_all();
                p.failures.forget_values();
                Ok(true)
            }
            Err(e) => {
                tracing::error!(error = %e, "htpasswd reload rejected; keeping the previous users");
                Err(e)
            }
        }
    }
}

impl Protected {
    /// 429 with `Retry-After` while `peer` is refused.
    fn refuse_if_blocked(&self, peer: IpAddr) -> Result<(), Error> {
        match self.failures.blocked(peer) {
            Some(left) => Err(Error::client_throttled(
                "too many failed logins from this address; try again later",
                left.as_secs().max(1),
            )),
            None => Ok(()),
        }
    }

    /// Records a failure and logs it, at most once per address per
    /// interval.
    fn failed(&self, peer: IpAddr, key: [u8; 32], user: &str) {
        if let Some(w) = self.failures.record(peer, key) {
            tracing::warn!(
                %peer,
                user = %user,
                earlier_failures_not_logged = w.unlogged,
                refused_for_a_while = w.blocked,
                "client authentication failed"
            );
        }
    }
}

/// `Basic base64(user:password)` → (user, password).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Htpasswd, AccessError> {
        Htpasswd::parse(Path::new("htpasswd"), text)
    }

    #[test]
    fn parses_bcrypt_and_refuses_the_rest() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let h = file(&format!("# users\n\nalice:{hash}\n")).unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.verify("alice", "secret"));
        assert!(!h.verify("alice", "Secret"));
        assert!(!h.verify("bob", "secret"));

        let e = file("bob:$apr1$abc$def\n").unwrap_err();
        assert!(e.to_string().contains("htpasswd:1"), "{e}");
        assert!(e.to_string().contains("bcrypt"), "{e}");
        let e = file(&format!("a:{hash}\na:{hash}\n")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(file("# nobody\n").is_err());
        assert!(file("no colon\n").is_err());
    }

    /// Found by the htpasswd fuzz target (hangs): an entry of cost 14 or 15
    /// made parsing compute a dummy hash at that cost (seconds; cost 31:
    /// days), and every login of that user would cost as much.
    #[test]
    fn high_costs_are_refused_and_parsing_hashes_nothing() {
        let at = |cost: u32| {
            let h = bcrypt::hash("x", 4).unwrap();
            format!("u:{}{cost:02}{}\n", &h[..4], &h[6..])
        };
        let e = file(&at(13)).unwrap_err();
        assert!(e.to_string().contains("cost 13"), "{e}");
        let e = file(&at(31)).unwrap_err();
        assert!(e.to_string().contains("htpasswd:1"), "{e}");
        let started = std::time::Instant::now();
        let h = file(&at(12)).unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_millis(50),
            "parsing took {:?}",
            started.elapsed()
        );
        assert!(h.dummy.get().is_none());
    }

    #[test]
    fn basic_header() {
        let v = HeaderValue::from_static("Basic YWxpY2U6czNjcjp0");
        assert_eq!(parse_basic(&v), Some(("alice".into(), "s3cr:t".into())));
        let v = HeaderValue::from_static("basic   YWxpY2U6czNjcjp0");
        assert!(parse_basic(&v).is_some());
        assert!(parse_basic(&HeaderValue::from_static("Bearer abc")).is_none());
        assert!(parse_basic(&HeaderValue::from_static("Basic !!!")).is_none());
    }
}
