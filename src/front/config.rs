//! The front door's configuration: `[tls]`, `[access]` and `[limits]`, with
//! their defaults and validation.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::error::ConfigError;

/// TLS termination (`[tls]`). Certificate, key and client CA are re-read on
/// SIGHUP and when their contents change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching the leaf.
    pub key: PathBuf,

    /// PEM CA bundle: when set, clients must present a certificate issued by
    /// one of these CAs (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,

    /// How often the files are checked for changes; `0s` turns polling off
    /// (SIGHUP still reloads).
    #[serde(default = "default_tls_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,

    /// A client that has not completed the TLS handshake after this long is
    /// disconnected.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    /// TLS from a certificate and key file with every other key at its
    /// default (what `--tls-cert`/`--tls-key` give).
    pub fn new(cert: PathBuf, key: PathBuf) -> TlsConfig {
        TlsConfig {
            cert,
            key,
            client_ca: None,
            reload_interval: default_tls_reload_interval(),
            handshake_timeout: default_handshake_timeout(),
        }
    }
}

/// Client authentication (`[access]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// htpasswd file with bcrypt entries (`htpasswd -B`); every request,
    /// `/v2/` included, then needs HTTP Basic credentials from it. Re-read on
    /// SIGHUP and when it changes.
    pub htpasswd: PathBuf,

    /// The realm named in the `WWW-Authenticate: Basic` challenge.
    #[serde(default = "default_realm")]
    pub realm: String,

    /// How often the file is checked for changes; `0s` turns polling off
    /// (SIGHUP still reloads).
    #[serde(default = "default_tls_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,

    /// Failed logins one client address may have per `failure_window`;
    /// after that it is answered 429 (with `Retry-After`) for the rest of
    /// the window, without checking passwords.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,

    /// The window of `max_failures`.
    #[serde(default = "default_failure_window", with = "humantime_serde")]
    pub failure_window: Duration,
}

/// Connection limits (`[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections served at once; further ones wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,

    /// Time a client has to send a complete HTTP/1 request head (and, on a
    /// new connection, its first byte): slow clients are dropped.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,

    /// A connection on which nothing is read or written for this long is
    /// closed (on HTTP/2 only requests and responses count, not PINGs).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,

    /// HTTP/2 streams (requests) one connection may have open at once.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,

    /// Process-wide budget of blob bytes read ahead into memory for TLS and
    /// HTTP/2 connections and not yet sent (plain HTTP/1 uses `sendfile`).
    #[serde(default = "default_read_ahead_budget")]
    pub read_ahead_budget: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_concurrent_streams: default_max_concurrent_streams(),
            read_ahead_budget: default_read_ahead_budget(),
        }
    }
}

fn default_tls_reload_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_realm() -> String {
    "stowage".into()
}

fn default_max_failures() -> u32 {
    10
}

fn default_failure_window() -> Duration {
    Duration::from_secs(60)
}

fn default_max_connections() -> usize {
    1024
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

fn default_max_concurrent_streams() -> u32 {
    100
}

fn default_read_ahead_budget() -> ByteSize {
    ByteSize::mib(32)
}

impl TlsConfig {
    /// Checks `[tls]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (k, p) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if p.as_os_str().is_empty() {
                return Err(ConfigError::invalid(k, "must name a file"));
            }
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "tls.handshake_timeout",
                "must be more than zero",
            ));
        }
        Ok(())
    }
}

impl AccessConfig {
    /// Checks `[access]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.htpasswd.as_os_str().is_empty() {
            return Err(ConfigError::invalid("access.htpasswd", "must name a file"));
        }
        if self.realm.is_empty()
            || !self.realm.chars().all(|c| c == ' ' || c.is_ascii_graphic())
            || self.realm.contains(['"', '\\'])
        {
            return Err(ConfigError::invalid(
                "access.realm",
                "must be printable ASCII without quotes or backslashes",
            ));
        }
        if self.max_failures == 0 {
            return Err(ConfigError::invalid(
                "access.max_failures",
                "must be at least 1",
            ));
        }
        if self.failure_window.is_zero() {
            return Err(ConfigError::invalid(
                "access.failure_window",
                "must be more than zero",
            ));
        }
        Ok(())
    }
}

impl LimitsConfig {
    /// Checks `[limits]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "limits.max_connections",
                "must be at least 1",
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "limits.header_read_timeout",
                "must be more than zero",
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "limits.idle_timeout",
                "must be more than zero",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::invalid(
                "limits.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if self.read_ahead_budget < ByteSize::mib(1) {
            return Err(ConfigError::invalid(
                "limits.read_ahead_budget",
                "must be at least 1MiB",
            ));
        }
        Ok(())
    }
}
