//! Typed configuration: one struct per subsystem, parsed from TOML with
//! unknown keys rejected, merged with command-line overrides, then validated.
//!
//! The embedded default (no file, no flags) is a Docker Hub mirror on
//! `0.0.0.0:5000` caching under `./data`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything stowage needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the registry API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,

    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`),
    /// plain HTTP; `"off"` disables it. Loopback by default.
    #[serde(
        default = "default_admin_listen",
        deserialize_with = "deserialize_admin_listen"
    )]
    pub admin_listen: Option<SocketAddr>,

    /// Directory holding the blob store, manifests, tags and temporary files.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,

    /// How long in-flight responses may run after SIGTERM/SIGINT before the
    /// process exits anyway.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,

    /// Log settings.
    #[serde(default)]
    pub log: LogConfig,

    /// Blob budget, eviction and pinning.
    #[serde(default)]
    pub cache: CacheConfig,

    /// The registries this mirror fronts. The first is the default upstream:
    /// requests that name no registry host go there.
    #[serde(default = "default_upstreams", rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,

    /// TLS termination on the registry listener; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,

    /// Client authentication for the mirror itself; open when absent.
    #[serde(default)]
    pub access: Option<AccessConfig>,

    /// Connection limits and timeouts of the registry listener.
    #[serde(default)]
    pub limits: LimitsConfig,
}

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
    /// closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// The blob cache's budget and what it must keep.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most bytes of blobs kept on disk (`"50GiB"`, `"500 MB"` or a number
    /// of bytes). Fills in flight count against it.
    #[serde(default = "default_max_size")]
    pub max_size: bytesize::ByteSize,

    /// Fraction of `max_size` above which least-recently-used blobs are
    /// evicted.
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,

    /// Fraction of `max_size` that eviction brings usage down to.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,

    /// Most manifests kept on disk (they are small and outside the blob
    /// budget); the least recently written are removed beyond this.
    #[serde(default = "default_max_manifests")]
    pub max_manifests: usize,

    /// Images whose blobs are never evicted, as `host/repo:tag` or
    /// `host/repo@digest` (`docker.io/library/postgres:16`). A name without
    /// a host means the default upstream.
    #[serde(default)]
    pub pin: Vec<String>,

    /// How often pinned tags are resolved again.
    #[serde(default = "default_pin_refresh", with = "humantime_serde")]
    pub pin_refresh: Duration,
}

fn default_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(20)
}

fn default_high_watermark() -> f64 {
    0.95
}

fn default_low_watermark() -> f64 {
    0.85
}

fn default_max_manifests() -> usize {
    100_000
}

fn default_pin_refresh() -> Duration {
    Duration::from_secs(600)
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: default_max_size(),
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            max_manifests: default_max_manifests(),
            pin: Vec::new(),
            pin_refresh: default_pin_refresh(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `stowage=debug`; `RUST_LOG` wins
    /// when set.
    #[serde(default)]
    pub level: Option<String>,
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable single lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// One upstream registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host this upstream mirrors, as clients name it
    /// (`docker.io`, `ghcr.io`, `registry.internal:5000`).
    pub host: String,

    /// Base URL requests are sent to (`https://registry-1.docker.io`).
    pub url: String,

    /// How long a tag's manifest is served without asking upstream again.
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    pub tag_ttl: Duration,

    /// Add `library/` to one-component repository names (Docker Hub).
    #[serde(default)]
    pub library_prefix: bool,

    /// Username for token or basic auth; anonymous when absent.
    #[serde(default)]
    pub username: Option<String>,

    /// Password given inline. Prefer `password_file` or `password_env`.
    #[serde(default)]
    pub password: Option<String>,

    /// File whose contents (trailing newline trimmed) are the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,

    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,

    /// Extra PEM CA certificates trusted for this upstream, on top of the
    /// system roots (for registries behind an internal CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,

    /// Timeout for connecting and for receiving response headers.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}

fn default_admin_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}

/// Parses an `admin_listen` value: a socket address, or `off` / `none` /
/// `""` for no admin listener.
pub fn parse_admin_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    match value.trim() {
        "" | "off" | "none" | "disabled" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|e| format!("{v:?} is not an address like 127.0.0.1:9090 (or \"off\"): {e}")),
    }
}

fn deserialize_admin_listen<'de, D>(d: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    parse_admin_listen(&text).map_err(serde::de::Error::custom)
}

fn default_cache_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
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

fn default_max_connections() -> usize {
    1024
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

/// Docker Hub, as a user who runs stowage with no configuration expects.
pub fn docker_hub() -> UpstreamConfig {
    UpstreamConfig {
        host: "docker.io".into(),
        url: "https://registry-1.docker.io".into(),
        tag_ttl: default_tag_ttl(),
        library_prefix: true,
        username: None,
        password: None,
        password_file: None,
        password_env: None,
        ca_file: None,
        timeout: default_upstream_timeout(),
    }
}

fn default_upstreams() -> Vec<UpstreamConfig> {
    vec![docker_hub()]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            cache_dir: default_cache_dir(),
            shutdown_timeout: default_shutdown_timeout(),
            log: LogConfig::default(),
            cache: CacheConfig::default(),
            upstreams: default_upstreams(),
            tls: None,
            access: None,
            limits: LimitsConfig::default(),
        }
    }
}

/// Why a configuration was refused. Messages name the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type; toml's message names the
    /// key and shows the line.
    #[error("{0}")]
    Parse(String),
    /// Parsed, but a value is not acceptable.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key (`upstream[0].url`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Applies `--upstream` values: `HOST=URL` entries, or a bare URL that
    /// replaces the default upstream's URL. The first `HOST=URL` given becomes
    /// the default; entries for hosts already configured replace their URL.
    pub fn apply_upstream_flags(&mut self, flags: &[String]) -> Result<(), ConfigError> {
        let mut named: Vec<UpstreamConfig> = Vec::new();
        for flag in flags {
            match flag.split_once('=') {
                Some((host, url)) => {
                    let mut up = self
                        .upstreams
                        .iter()
                        .find(|u| u.host == host)
                        .cloned()
                        .unwrap_or_else(|| UpstreamConfig {
                            host: host.to_string(),
                            library_prefix: host == "docker.io",
                            ..docker_hub()
                        });
                    up.url = url.to_string();
                    named.retain(|u| u.host != host);
                    named.push(up);
                }
                None => {
                    let default = self
                        .upstreams
                        .first_mut()
                        .ok_or_else(|| invalid("upstream", "no upstream to apply --upstream to"))?;
                    default.url = flag.clone();
                }
            }
        }
        if !named.is_empty() {
            let rest: Vec<UpstreamConfig> = self
                .upstreams
                .drain(..)
                .filter(|u| !named.iter().any(|n| n.host == u.host))
                .collect();
            named.extend(rest);
            self.upstreams = named;
        }
        self.validate()
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(invalid(
                "admin_listen",
                format!("{} is also `listen`", self.listen),
            ));
        }
        if let Some(level) = &self.log.level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            return Err(invalid("log.level", format!("{level:?}: {e}")));
        }
        let c = &self.cache;
        if c.max_size.as_u64() == 0 {
            return Err(invalid("cache.max_size", "must be more than zero"));
        }
        if !(c.high_watermark > 0.0 && c.high_watermark <= 1.0) {
            return Err(invalid("cache.high_watermark", "must be in (0, 1]"));
        }
        if !(c.low_watermark > 0.0 && c.low_watermark <= c.high_watermark) {
            return Err(invalid(
                "cache.low_watermark",
                "must be more than 0 and at most cache.high_watermark",
            ));
        }
        if c.max_manifests == 0 {
            return Err(invalid("cache.max_manifests", "must be more than zero"));
        }
        if c.pin_refresh.is_zero() {
            return Err(invalid("cache.pin_refresh", "must be more than zero"));
        }
        for (i, image) in c.pin.iter().enumerate() {
            match crate::oci::ImageRef::parse(image) {
                Err(e) => return Err(invalid(format!("cache.pin[{i}]"), e.message)),
                Ok(r) => {
                    if let Some(h) = &r.host
                        && !self.upstreams.iter().any(|u| &u.host == h)
                    {
                        return Err(invalid(
                            format!("cache.pin[{i}]"),
                            format!("no upstream is configured for registry host {h:?}"),
                        ));
                    }
                }
            }
        }
        if self.upstreams.is_empty() {
            return Err(invalid("upstream", "at least one upstream is required"));
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if !up.host.starts_with(|c: char| c.is_ascii_alphanumeric())
                || !up
                    .host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
            {
                return Err(invalid(
                    key("host"),
                    format!("{:?} is not a registry host name", up.host),
                ));
            }
            if self.upstreams[..i].iter().any(|u| u.host == up.host) {
                return Err(invalid(
                    key("host"),
                    format!("{:?} is configured twice", up.host),
                ));
            }
            let uri: http::Uri = up
                .url
                .parse()
                .map_err(|e| invalid(key("url"), format!("{:?}: {e}", up.url)))?;
            match uri.scheme_str() {
                Some("http") | Some("https") => {}
                _ => {
                    return Err(invalid(
                        key("url"),
                        format!("{:?} must start with http:// or https://", up.url),
                    ));
                }
            }
            if uri.host().is_none() {
                return Err(invalid(key("url"), format!("{:?} has no host", up.url)));
            }
            if uri.query().is_some() {
                return Err(invalid(
                    key("url"),
                    format!("{:?} must not have a query", up.url),
                ));
            }
            let secrets = [
                up.password.is_some(),
                up.password_file.is_some(),
                up.password_env.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if secrets > 1 {
                return Err(invalid(
                    key("password"),
                    "give only one of password, password_file, password_env",
                ));
            }
            if secrets == 1 && up.username.is_none() {
                return Err(invalid(key("username"), "a password needs a username"));
            }
            if up.timeout.is_zero() {
                return Err(invalid(key("timeout"), "must be more than zero"));
            }
        }
        self.validate_front()?;
        Ok(())
    }

    /// Checks `[tls]`, `[access]` and `[limits]`.
    fn validate_front(&self) -> Result<(), ConfigError> {
        if let Some(tls) = &self.tls {
            for (k, p) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if p.as_os_str().is_empty() {
                    return Err(invalid(k, "must name a file"));
                }
            }
            if tls.handshake_timeout.is_zero() {
                return Err(invalid("tls.handshake_timeout", "must be more than zero"));
            }
        }
        if let Some(access) = &self.access {
            if access.htpasswd.as_os_str().is_empty() {
                return Err(invalid("access.htpasswd", "must name a file"));
            }
            if access.realm.is_empty()
                || !access
                    .realm
                    .chars()
                    .all(|c| c == ' ' || c.is_ascii_graphic())
                || access.realm.contains(['"', '\\'])
            {
                return Err(invalid(
                    "access.realm",
                    "must be printable ASCII without quotes or backslashes",
                ));
            }
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if l.header_read_timeout.is_zero() {
            return Err(invalid(
                "limits.header_read_timeout",
                "must be more than zero",
            ));
        }
        if l.idle_timeout.is_zero() {
            return Err(invalid("limits.idle_timeout", "must be more than zero"));
        }
        Ok(())
    }

    /// Applies `--tls-cert FILE --tls-key FILE` (given together): TLS with
    /// these files, keeping any other `[tls]` settings from the file.
    pub fn apply_tls_flags(
        &mut self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<(), ConfigError> {
        match (cert, key) {
            (None, None) => Ok(()),
            (Some(cert), Some(key)) => {
                match &mut self.tls {
                    Some(tls) => {
                        tls.cert = cert;
                        tls.key = key;
                    }
                    None => self.tls = Some(TlsConfig::new(cert, key)),
                }
                self.validate()
            }
            _ => Err(invalid(
                "tls",
                "--tls-cert and --tls-key must be given together",
            )),
        }
    }
}

impl UpstreamConfig {
    /// Resolves the configured password from whichever source holds it.
    pub fn resolve_password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                invalid(
                    format!("upstream.{}.password_env", self.host),
                    format!("environment variable {var} is not set"),
                )
            });
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_docker_hub() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert!(c.upstreams[0].library_prefix);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml_str("listen = \"127.0.0.1:1\"\ncache_dri = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("cache_dri"), "{e}");
        let e =
            Config::from_toml_str("[[upstream]]\nhost = \"a\"\nurl = \"http://a\"\nttl = \"1s\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("ttl"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e =
            Config::from_toml_str("[[upstream]]\nhost = \"a\"\nurl = \"ftp://a\"\n").unwrap_err();
        assert!(e.to_string().contains("upstream[0].url"), "{e}");
        let e = Config::from_toml_str("listen = \"nope\"\n").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::from_toml_str(
            "[[upstream]]\nhost = \"a\"\nurl = \"http://a\"\n[[upstream]]\nhost = \"a\"\nurl = \"http://b\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("upstream[1].host"), "{e}");
    }

    #[test]
    fn cache_settings() {
        let c = Config::from_toml_str(
            "[cache]\nmax_size = \"2GiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.8\npin = [\"docker.io/library/postgres:16\"]\n",
        )
        .unwrap();
        assert_eq!(c.cache.max_size.as_u64(), 2 << 30);
        let e = Config::from_toml_str("[cache]\nmax_size = \"lots\"\n").unwrap_err();
        assert!(e.to_string().contains("max_size"), "{e}");
        let e = Config::from_toml_str("[cache]\nlow_watermark = 0.99\n").unwrap_err();
        assert!(e.to_string().contains("cache.low_watermark"), "{e}");
        let e = Config::from_toml_str("[cache]\npin = [\"Bad Name\"]\n").unwrap_err();
        assert!(e.to_string().contains("cache.pin[0]"), "{e}");
        let e = Config::from_toml_str("[cache]\nmax_sise = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_sise"), "{e}");
    }

    #[test]
    fn tls_access_and_limits() {
        let c = Config::from_toml_str("").unwrap();
        assert!(c.tls.is_none() && c.access.is_none());
        assert_eq!(c.limits.max_connections, 1024);
        let c = Config::from_toml_str(
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n\
             [access]\nhtpasswd = \"h\"\n[limits]\nidle_timeout = \"5s\"\n",
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(tls.reload_interval, Duration::from_secs(5));
        assert_eq!(c.access.unwrap().realm, "stowage");
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5));
        for (toml, key) in [
            ("[tls]\ncert = \"c\"\n", "key"),
            ("[tls]\ncert = \"c\"\nkey = \"k\"\nkye = 1\n", "kye"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            (
                "[limits]\nheader_read_timeout = \"0s\"\n",
                "limits.header_read_timeout",
            ),
            (
                "[access]\nhtpasswd = \"h\"\nrealm = \"a\\\"b\"\n",
                "access.realm",
            ),
        ] {
            let e = Config::from_toml_str(toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }

        let mut c = Config::default();
        c.apply_tls_flags(Some("c.pem".into()), Some("k.pem".into()))
            .unwrap();
        assert_eq!(c.tls.unwrap().key, PathBuf::from("k.pem"));
        let mut c = Config::default();
        assert!(c.apply_tls_flags(Some("c.pem".into()), None).is_err());
    }

    #[test]
    fn shipped_example_parses() {
        let c = Config::from_toml_str(include_str!("../config/stowage.toml")).unwrap();
        assert_eq!(c.upstreams[0].url, "https://registry-1.docker.io");
    }

    #[test]
    fn upstream_flags() {
        let mut c = Config::default();
        c.apply_upstream_flags(&["http://127.0.0.1:9".into()])
            .unwrap();
        assert_eq!(c.upstreams[0].url, "http://127.0.0.1:9");
        assert_eq!(c.upstreams[0].host, "docker.io");

        let mut c = Config::default();
        c.apply_upstream_flags(&[
            "ghcr.io=https://ghcr.io".into(),
            "docker.io=http://x".into(),
        ])
        .unwrap();
        assert_eq!(c.upstreams[0].host, "ghcr.io");
        assert!(!c.upstreams[0].library_prefix);
        assert_eq!(c.upstreams[1].host, "docker.io");
        assert_eq!(c.upstreams[1].url, "http://x");
        assert!(c.upstreams[1].library_prefix);
        assert_eq!(c.upstreams.len(), 2);
    }

    #[test]
    fn admin_listen_and_log_level() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let c = Config::from_toml_str("admin_listen = \"0.0.0.0:9100\"\n").unwrap();
        assert_eq!(c.admin_listen, Some("0.0.0.0:9100".parse().unwrap()));
        let c = Config::from_toml_str("admin_listen = \"off\"\n").unwrap();
        assert_eq!(c.admin_listen, None);
        let e = Config::from_toml_str("admin_listen = \"nine\"\n").unwrap_err();
        assert!(e.to_string().contains("admin_listen"), "{e}");
        let e = Config::from_toml_str(
            "listen = \"127.0.0.1:5000\"\nadmin_listen = \"127.0.0.1:5000\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("admin_listen"), "{e}");
        let e = Config::from_toml_str("[log]\nlevel = \"stowage=loud\"\n").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        Config::from_toml_str("[log]\nformat = \"json\"\nlevel = \"stowage=debug,info\"\n")
            .unwrap();
    }
}
