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

    /// The registries this mirror fronts. The first is the default upstream:
    /// requests that name no registry host go there.
    #[serde(default = "default_upstreams", rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
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
            cache_dir: default_cache_dir(),
            shutdown_timeout: default_shutdown_timeout(),
            log: LogConfig::default(),
            upstreams: default_upstreams(),
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
        Ok(())
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
}
