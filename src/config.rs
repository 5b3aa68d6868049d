//! The configuration as a whole: the server-level settings, and each
//! subsystem's section, which owns its type, defaults and validation
//! (`[[upstream]]` in `upstream/config.rs`, `[cache]` in `cache/config.rs`,
//! `[prefetch]` in `cache/prefetch.rs`,
//! `[tls]`, `[access]` and `[limits]` in `front/config.rs`, `[log]` in
//! `logging.rs`). This module parses the TOML (unknown keys rejected),
//! merges command-line overrides and runs every part's validation.
//!
//! The embedded default (no file, no flags) is a Docker Hub mirror on
//! `0.0.0.0:5000` caching under `./data`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::bucket::config::StoreConfig;
pub use crate::cache::config::CacheConfig;
pub use crate::cache::prefetch::PrefetchConfig;
pub use crate::cluster::config::ClusterConfig;
pub use crate::error::ConfigError;
pub use crate::front::config::{AccessConfig, LimitsConfig, TlsConfig};
pub use crate::logging::{LogConfig, LogFormat};
use crate::upstream::config::same_host;
pub use crate::upstream::config::{AuthMode, UpstreamConfig, docker_hub};

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

    /// Fills for an image's blobs started when its manifest is served
    /// (`prefetch = false` turns it off).
    #[serde(default)]
    pub prefetch: PrefetchConfig,

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

    /// Several nodes acting as one cache; a single node without this table.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,

    /// A bucket shared by the nodes, behind each node's disk.
    #[serde(default)]
    pub store: Option<StoreConfig>,
}

/// Command-line values that override the file (all optional).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--upstream`, repeated: see [`Config::apply_upstream_flags`].
    pub upstream: Vec<String>,
    /// `--cache-dir`.
    pub cache_dir: Option<PathBuf>,
    /// `--max-size`.
    pub max_size: Option<bytesize::ByteSize>,
    /// `--tls-cert` (with `--tls-key`).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` (with `--tls-cert`).
    pub tls_key: Option<PathBuf>,
    /// `--admin-listen`: an address or `off`.
    pub admin_listen: Option<String>,
    /// `--advertise`: how peers reach this node.
    pub advertise: Option<String>,
    /// `--peer`, repeated: the cluster's nodes (replacing `cluster.peers`).
    pub peers: Vec<String>,
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
            prefetch: PrefetchConfig::default(),
            upstreams: default_upstreams(),
            tls: None,
            access: None,
            limits: LimitsConfig::default(),
            cluster: None,
            store: None,
        }
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

    /// The file at `path` (or the embedded default without one) with the
    /// command-line `overrides` applied, validated.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = &overrides.cache_dir {
            config.cache_dir = dir.clone();
        }
        if let Some(size) = overrides.max_size {
            config.cache.max_size = size;
        }
        if let Some(admin) = &overrides.admin_listen {
            config.admin_listen = parse_admin_listen(admin)
                .map_err(|message| ConfigError::invalid("--admin-listen", message))?;
        }
        config.apply_upstream_flags(&overrides.upstream)?;
        config.apply_tls_flags(overrides.tls_cert.clone(), overrides.tls_key.clone())?;
        config.apply_cluster_flags(overrides.advertise.clone(), &overrides.peers)?;
        Ok(config)
    }

    /// Applies `--advertise URL` and `--peer URL` (repeated): they replace
    /// `cluster.advertise` and `cluster.peers`, creating `[cluster]` when
    /// the file has none.
    pub fn apply_cluster_flags(
        &mut self,
        advertise: Option<String>,
        peers: &[String],
    ) -> Result<(), ConfigError> {
        if advertise.is_none() && peers.is_empty() {
            return Ok(());
        }
        let cluster = self
            .cluster
            .get_or_insert_with(|| ClusterConfig::from_flags(None, Vec::new()));
        if advertise.is_some() {
            cluster.advertise = advertise;
        }
        if !peers.is_empty() {
            cluster.peers = peers.to_vec();
            cluster.peers_dns = None;
        }
        self.validate()
    }

    /// Applies `--upstream` values: `HOST=URL` entries, or a bare URL that
    /// replaces the default upstream's URL. The first `HOST=URL` given becomes
    /// the default; entries for hosts already configured replace their URL.
    pub fn apply_upstream_flags(&mut self, flags: &[String]) -> Result<(), ConfigError> {
        let mut named: Vec<UpstreamConfig> = Vec::new();
        for flag in flags {
            match flag.split_once('=') {
                Some((host, url)) => {
                    // The entry for this registry, under whichever of its
                    // names (and as an earlier flag left it).
                    let earlier = named.iter().chain(&self.upstreams);
                    let mut up = earlier
                        .into_iter()
                        .find(|u| same_host(&u.host, host))
                        .cloned()
                        .unwrap_or_else(|| UpstreamConfig {
                            host: host.to_string(),
                            library_prefix: same_host(host, "docker.io"),
                            ..docker_hub()
                        });
                    up.url = url.to_string();
                    named.retain(|u| !same_host(&u.host, host));
                    named.push(up);
                }
                None => {
                    let default = self.upstreams.first_mut().ok_or_else(|| {
                        ConfigError::invalid("upstream", "no upstream to apply --upstream to")
                    })?;
                    default.url = flag.clone();
                    // A HOST=URL flag before it for the same registry: the
                    // later flag wins there too.
                    if let Some(n) = named.iter_mut().find(|n| same_host(&n.host, &default.host)) {
                        n.url = flag.clone();
                    }
                }
            }
        }
        if !named.is_empty() {
            let rest: Vec<UpstreamConfig> = self
                .upstreams
                .drain(..)
                .filter(|u| !named.iter().any(|n| same_host(&n.host, &u.host)))
                .collect();
            named.extend(rest);
            self.upstreams = named;
        }
        self.validate()
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
            _ => Err(ConfigError::invalid(
                "tls",
                "--tls-cert and --tls-key must be given together",
            )),
        }
    }

    /// Checks values that parse but make no sense: the server-level ones
    /// here, then each section's own validation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "admin_listen",
                format!("{} is also `listen`", self.listen),
            ));
        }
        self.log.validate()?;
        self.cache.validate()?;
        self.prefetch.validate()?;
        for (i, image) in self.cache.pin.iter().enumerate() {
            let pin = crate::cache::config::parse_pin(i, image)?;
            // A pin naming a registry host needs an upstream for it.
            let upstream = match &pin.host {
                Some(h) => self.upstreams.iter().find(|u| same_host(&u.host, h)),
                None => self.upstreams.first(),
            };
            let Some(upstream) = upstream else {
                return Err(ConfigError::invalid(
                    format!("cache.pin[{i}]"),
                    format!(
                        "no upstream is configured for registry host {:?}",
                        pin.host.as_deref().unwrap_or_default()
                    ),
                ));
            };
            // Pins are resolved with the mirror's own access, which a
            // passthrough upstream does not have (each caller brings its
            // own): a private image could never be pinned, a public one
            // would be marked public without a mirror-mode upstream's word.
            if upstream.auth == AuthMode::Passthrough {
                return Err(ConfigError::invalid(
                    format!("cache.pin[{i}]"),
                    format!(
                        "{image:?} is on {:?}, a passthrough upstream: pins are fetched with \
                         the mirror's own access, which it does not have",
                        upstream.host
                    ),
                ));
            }
        }
        crate::upstream::config::validate_all(&self.upstreams)?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(access) = &self.access {
            access.validate()?;
            // Both would read the caller's `Authorization`: the mirror's
            // htpasswd check and the upstream the credential is meant for.
            // No sound way to tell whose a header is, so refuse the pair.
            if let Some(up) = self
                .upstreams
                .iter()
                .find(|u| u.auth == AuthMode::Passthrough)
            {
                return Err(ConfigError::invalid(
                    "access",
                    format!(
                        "[access] cannot be combined with auth = \"passthrough\" (upstream {:?}): \
                         both use the caller's Authorization header; restrict who reaches the \
                         mirror with the network or mTLS ([tls] client_ca) instead",
                        up.host
                    ),
                ));
            }
        }
        if let Some(store) = &self.store {
            store.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            self.validate_cluster_access(cluster)?;
        }
        self.limits.validate()
    }

    /// Peers must get past the access control every node applies.
    fn validate_cluster_access(&self, cluster: &ClusterConfig) -> Result<(), ConfigError> {
        if self.access.is_some() && cluster.secret_file.is_none() {
            return Err(ConfigError::invalid(
                "cluster.secret_file",
                "required with [access]: peers carry the cluster secret, not htpasswd credentials",
            ));
        }
        let mtls = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if mtls && cluster.client_cert.is_none() {
            return Err(ConfigError::invalid(
                "cluster.client_cert",
                "required with tls.client_ca: peers must present a client certificate",
            ));
        }
        Ok(())
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
        // Credentials go in username/password*, never in the URL (they
        // would be logged, and sent wherever the URL is).
        for url in [
            "https://bot:s3cret@registry.example",
            "https://bot@registry.example",
        ] {
            let toml = format!("[[upstream]]\nhost = \"a\"\nurl = \"{url}\"\n");
            let e = Config::from_toml_str(&toml).unwrap_err().to_string();
            assert!(
                e.contains("upstream[0].url") && e.contains("username"),
                "{e}"
            );
            assert!(!e.contains("s3cret"), "the password is echoed: {e}");
        }
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
        assert_eq!(c.cache.max_blob_bytes(), 2 << 30, "defaults to max_size");
        let c = Config::from_toml_str("[cache]\nmax_size = \"2GiB\"\nmax_blob_size = \"1GiB\"\n")
            .unwrap();
        assert_eq!(c.cache.max_blob_bytes(), 1 << 30);
        for bad in ["\"3GiB\"", "0"] {
            let toml = format!("[cache]\nmax_size = \"2GiB\"\nmax_blob_size = {bad}\n");
            let e = Config::from_toml_str(&toml).unwrap_err();
            assert!(e.to_string().contains("cache.max_blob_size"), "{e}");
        }
        assert_eq!(c.cache.max_manifest_bytes.as_u64(), 1 << 30, "the default");
        let c = Config::from_toml_str("[cache]\nmax_manifest_bytes = \"64MiB\"\n").unwrap();
        assert_eq!(c.cache.max_manifest_bytes.as_u64(), 64 << 20);
        let e = Config::from_toml_str("[cache]\nmax_manifest_bytes = \"1MiB\"\n").unwrap_err();
        assert!(e.to_string().contains("cache.max_manifest_bytes"), "{e}");
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
            ("[cache]\nscrub_max_rate = 0\n", "cache.scrub_max_rate"),
            (
                "[cache]\nscrub_interval = \"10ms\"\n",
                "cache.scrub_interval",
            ),
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
    fn passthrough_auth() {
        let up = "[[upstream]]\nhost = \"r.example\"\nurl = \"https://r.example\"\n";
        let c = Config::from_toml_str(&format!("{up}auth = \"passthrough\"\n")).unwrap();
        assert_eq!(c.upstreams[0].auth, AuthMode::Passthrough);
        assert_eq!(c.upstreams[0].passthrough_ttl, Duration::from_secs(60));
        let c = Config::from_toml_str(up).unwrap();
        assert_eq!(c.upstreams[0].auth, AuthMode::Mirror);
        for (toml, key) in [
            (format!("{up}auth = \"both\"\n"), "auth"),
            (
                format!("{up}auth = \"passthrough\"\nusername = \"u\"\npassword = \"p\"\n"),
                "upstream[0].auth",
            ),
            (
                format!("{up}auth = \"passthrough\"\npassthrough_ttl = \"0s\"\n"),
                "upstream[0].passthrough_ttl",
            ),
            (
                format!("[access]\nhtpasswd = \"h\"\n{up}auth = \"passthrough\"\n"),
                "`access`",
            ),
        ] {
            let e = Config::from_toml_str(&toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn cluster_and_store_sections() {
        let c = Config::from_toml_str(
            "[cluster]\nadvertise = \"http://a:5000\"\npeers = [\"http://a:5000\", \"http://b:5000\"]\n\
             [store]\nurl = \"s3://bucket/prefix\"\nendpoint = \"http://garage:3900\"\nregion = \"garage\"\n",
        )
        .unwrap();
        assert_eq!(c.cluster.unwrap().peers.len(), 2);
        assert_eq!(c.store.unwrap().upload_concurrency, 2);
        for (toml, key) in [
            // Peers cannot answer an htpasswd challenge: the secret is theirs.
            (
                "[access]\nhtpasswd = \"h\"\n[cluster]\npeers = [\"http://a:1\", \"http://b:1\"]\n",
                "cluster.secret_file",
            ),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n[cluster]\npeers = [\"http://a:1\"]\n",
                "cluster.client_cert",
            ),
            ("[store]\nurl = \"ftp://x/y\"\n", "store.url"),
            (
                "[store]\nurl = \"s3://b/p\"\nupload_concurrency = 0\n",
                "store.upload_concurrency",
            ),
            ("[cluster]\npeers = [\"http://a:1\"]\npeerz = 1\n", "peerz"),
        ] {
            let e = Config::from_toml_str(toml).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        // The flags make a cluster of a file that has none.
        let mut c = Config::default();
        c.apply_cluster_flags(Some("http://a:1".into()), &["http://b:1".into()])
            .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.advertise.as_deref(), Some("http://a:1"));
        assert_eq!(cluster.peers, vec!["http://b:1".to_string()]);
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

        // Docker Hub under another of its names is the same entry.
        let mut c = Config::default();
        c.apply_upstream_flags(&["index.docker.io=http://y".into()])
            .unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].host, "docker.io");
        assert_eq!(c.upstreams[0].url, "http://y");
        assert!(c.upstreams[0].library_prefix);

        // The last flag for a registry wins, bare or named.
        let mut c = Config::default();
        c.apply_upstream_flags(&["docker.io=http://a".into(), "http://b".into()])
            .unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].url, "http://b");
    }

    /// Two tables for one registry under two of its names: the router would
    /// only ever use the first.
    #[test]
    fn docker_hub_aliases_are_one_upstream() {
        let e = Config::from_toml_str(
            "[[upstream]]\nhost = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             [[upstream]]\nhost = \"index.docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             auth = \"passthrough\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("configured twice"), "{e}");
        assert!(e.to_string().contains("upstream[1].host"), "{e}");
        // A pin may name Docker Hub by any of its names.
        Config::from_toml_str("[cache]\npin = [\"index.docker.io/library/alpine:3\"]\n").unwrap();
        // Not one on a passthrough upstream (fetched with the mirror's own
        // access, which it has not).
        let e = Config::from_toml_str(
            "[cache]\npin = [\"alpine:3\"]\n\
             [[upstream]]\nhost = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             auth = \"passthrough\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("cache.pin[0]"), "{e}");
        assert!(e.to_string().contains("passthrough"), "{e}");
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
