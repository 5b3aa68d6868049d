//! The configuration of one upstream registry (`[[upstream]]`), with its
//! defaults, validation and credentials.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

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

    /// Whose credentials reach this upstream: the mirror's own
    /// (`"mirror"`, the default: `username`/`password` or anonymous) or
    /// each caller's own (`"passthrough"`).
    #[serde(default)]
    pub auth: AuthMode,

    /// With `auth = "passthrough"`: how long upstream's answer that a
    /// caller's credential may read a repository (and which digests it
    /// holds) is remembered, at most (a token's own expiry comes first).
    #[serde(default = "default_passthrough_ttl", with = "humantime_serde")]
    pub passthrough_ttl: Duration,

    /// Follow redirects, and fetch tokens from realms, at loopback,
    /// link-local and private addresses even when the upstream itself is
    /// not at such an address (off: a registry cannot send the mirror, or
    /// its credentials, into its own network, at cloud metadata endpoints
    /// for instance).
    #[serde(default)]
    pub allow_private_redirects: bool,

    /// How many pooled clients requests to this upstream are spread over
    /// (round robin). Over HTTP/2, where one client multiplexes everything
    /// on one connection, this is how many connections concurrent fills
    /// use; over HTTP/1.1 each request in flight has a connection anyway.
    #[serde(default = "default_connections")]
    pub connections: usize,
}

fn default_connections() -> usize {
    4
}

/// Whose credentials an upstream sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The mirror's own credentials (or none): anyone who reaches the
    /// mirror reads what they can read.
    #[default]
    Mirror,
    /// Each caller's own `Authorization`, passed on for that request only;
    /// cached content is served only to callers upstream lets read it.
    Passthrough,
}

fn default_passthrough_ttl() -> Duration {
    Duration::from_secs(60)
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
        auth: AuthMode::Mirror,
        passthrough_ttl: default_passthrough_ttl(),
        allow_private_redirects: false,
        connections: default_connections(),
    }
}

/// Checks the list of upstreams: at least one, hosts unique, each valid.
/// Docker Hub goes by several names: one registry, one upstream.
pub(crate) fn canonical_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        h => h,
    }
}

/// Whether `a` and `b` name the same registry.
pub(crate) fn same_host(a: &str, b: &str) -> bool {
    canonical_host(a) == canonical_host(b)
}

pub fn validate_all(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    if upstreams.is_empty() {
        return Err(ConfigError::invalid(
            "upstream",
            "at least one upstream is required",
        ));
    }
    for (i, up) in upstreams.iter().enumerate() {
        up.validate(i, &upstreams[..i])?;
    }
    Ok(())
}

impl UpstreamConfig {
    /// Checks this upstream, the `i`th in the file (for key names), after
    /// `earlier` ones.
    pub fn validate(&self, i: usize, earlier: &[UpstreamConfig]) -> Result<(), ConfigError> {
        let key = |k: &str| format!("upstream[{i}].{k}");
        let invalid = |k: &str, message: String| ConfigError::invalid(key(k), message);
        if !self.host.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !self
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        {
            return Err(invalid(
                "host",
                format!("{:?} is not a registry host name", self.host),
            ));
        }
        if let Some(u) = earlier.iter().find(|u| same_host(&u.host, &self.host)) {
            let also = if u.host == self.host {
                String::new()
            } else {
                format!(" (as {:?}: Docker Hub goes by several names)", u.host)
            };
            return Err(invalid(
                "host",
                format!("{:?} is configured twice{also}", self.host),
            ));
        }
        self.validate_url(&key("url"))?;
        let secrets = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if secrets > 1 {
            return Err(invalid(
                "password",
                "give only one of password, password_file, password_env".into(),
            ));
        }
        if secrets == 1 && self.username.is_none() {
            return Err(invalid("username", "a password needs a username".into()));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be more than zero".into()));
        }
        if self.auth == AuthMode::Passthrough {
            if self.username.is_some() || secrets > 0 {
                return Err(invalid(
                    "auth",
                    "\"passthrough\" sends each caller's own credentials upstream; \
                     remove username and password (the mirror's own would never be used)"
                        .into(),
                ));
            }
            if self.passthrough_ttl.is_zero() {
                return Err(invalid("passthrough_ttl", "must be more than zero".into()));
            }
        }
        if !(1..=64).contains(&self.connections) {
            return Err(invalid("connections", "must be 1 to 64".into()));
        }
        Ok(())
    }

    fn validate_url(&self, key: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::invalid(key, message);
        // Credentials in the URL would be logged and sent wherever the URL
        // goes; they belong in username and a password source. Checked
        // first, and the URL is not echoed.
        let authority = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        if authority.contains('@') {
            return Err(invalid(
                "must not contain credentials (user:password@): use username with \
                 password_file or password_env"
                    .into(),
            ));
        }
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| invalid(format!("{:?}: {e}", self.url)))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(invalid(format!(
                "{:?} must start with http:// or https://",
                self.url
            )));
        }
        if uri.host().is_none() {
            return Err(invalid(format!("{:?} has no host", self.url)));
        }
        if uri.query().is_some() {
            return Err(invalid(format!("{:?} must not have a query", self.url)));
        }
        Ok(())
    }

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
                ConfigError::invalid(
                    format!("upstream.{}.password_env", self.host),
                    format!("environment variable {var} is not set"),
                )
            });
        }
        Ok(None)
    }
}
