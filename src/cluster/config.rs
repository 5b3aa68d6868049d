//! The cluster's configuration (`[cluster]`, or `--advertise` and
//! `--peer`): how peers reach this node, who the peers are (a static list,
//! or a DNS name re-resolved every few seconds), the shared secret peer
//! requests carry, and the TLS material for talking to peers.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// Several stowage nodes acting as one cache.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How peers reach this node (`http://10.0.0.1:5000`). Must be spelled
    /// as the other nodes spell it in their peer lists: it is how a node
    /// finds itself among its peers.
    #[serde(default)]
    pub advertise: Option<String>,

    /// Every node of the cluster, this one included or not (it is added).
    #[serde(default)]
    pub peers: Vec<String>,

    /// `host:port` resolved every `dns_interval` to the peers' addresses
    /// (a Kubernetes headless Service); peers are then
    /// `<scheme>://<address>:<port>`, https when `[tls]` is set.
    #[serde(default)]
    pub peers_dns: Option<String>,

    /// How often `peers_dns` is resolved again.
    #[serde(default = "default_dns_interval", with = "humantime_serde")]
    pub dns_interval: Duration,

    /// A file whose contents (surrounding whitespace trimmed, at least 16
    /// bytes) every peer request carries; peer requests without it are
    /// refused. Required when `[access]` or client certificates are on.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,

    /// Connecting to a peer: longer than this and the peer is marked down.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// Extra PEM CA certificates trusted for peers' TLS certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,

    /// PEM client certificate chain presented to peers (needed when
    /// `tls.client_ca` makes every node require client certificates).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

fn default_dns_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

impl ClusterConfig {
    /// A cluster from the command line's `--advertise` and `--peer` flags.
    pub fn from_flags(advertise: Option<String>, peers: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            advertise,
            peers,
            dns_interval: default_dns_interval(),
            connect_timeout: default_connect_timeout(),
            ..ClusterConfig::default()
        }
    }

    /// Checks the URLs and the combinations of keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("cluster.{k}"), m);
        // May come from --advertise at start (a Kubernetes pod's IP), so a
        // file without it is fine; starting without it is not (see
        // `Cluster::new`).
        if let Some(advertise) = &self.advertise {
            normalize_url(advertise).map_err(|m| invalid("advertise", m))?;
        }
        match (&self.peers_dns, self.peers.is_empty()) {
            (Some(_), false) => {
                return Err(invalid(
                    "peers_dns",
                    "give either peers or peers_dns, not both".into(),
                ));
            }
            (None, true) => {
                return Err(invalid(
                    "peers",
                    "a cluster needs peers (--peer URL) or peers_dns".into(),
                ));
            }
            _ => {}
        }
        let mut seen = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let url = normalize_url(p).map_err(|m| invalid(&format!("peers[{i}]"), m))?;
            if seen.contains(&url) {
                return Err(invalid(
                    &format!("peers[{i}]"),
                    format!("{p:?} is listed twice"),
                ));
            }
            seen.push(url);
        }
        if let Some(dns) = &self.peers_dns {
            split_host_port(dns).map_err(|m| invalid("peers_dns", m))?;
            if self.dns_interval.is_zero() {
                return Err(invalid("dns_interval", "must be more than zero".into()));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be more than zero".into()));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid(
                "client_cert",
                "client_cert and client_key go together".into(),
            ));
        }
        Ok(())
    }
}

/// A peer URL in the one spelling every node ranks by:
/// `scheme://host:port`, lower case, the port always written, no path.
pub(crate) fn normalize_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} must be an http:// or https:// URL"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must have no path, query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?} must not carry credentials"));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("{text:?} has no port"))?;
    Ok(format!(
        "{}://{}:{port}",
        url.scheme(),
        host.to_ascii_lowercase()
    ))
}

/// `host:port` of `peers_dns`.
pub(crate) fn split_host_port(text: &str) -> Result<(&str, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} must be host:port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{text:?}: {port:?} is not a port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(format!("{text:?} must be host:port"));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_have_one_spelling() {
        assert_eq!(
            normalize_url("http://Node-1.Example:5000/").unwrap(),
            "http://node-1.example:5000"
        );
        assert_eq!(
            normalize_url("https://10.0.0.1").unwrap(),
            "https://10.0.0.1:443"
        );
        assert_eq!(
            normalize_url("http://[::1]:5000").unwrap(),
            "http://[::1]:5000"
        );
        for bad in [
            "ftp://x:1",
            "http://x:1/v2/",
            "http://x:1?a=b",
            "http://u:p@x:1",
            "x:1",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let ok = ClusterConfig::from_flags(
            Some("http://a:1".into()),
            vec!["http://a:1".into(), "http://b:1".into()],
        );
        ok.validate().unwrap();
        let cases = [
            (
                ClusterConfig::from_flags(Some("a:1".into()), vec!["http://a:1".into()]),
                "cluster.advertise",
            ),
            (
                ClusterConfig::from_flags(Some("http://a:1".into()), vec![]),
                "cluster.peers",
            ),
            (
                ClusterConfig::from_flags(
                    Some("http://a:1".into()),
                    vec!["http://b:1".into(), "http://B:1/".into()],
                ),
                "cluster.peers[1]",
            ),
            (
                ClusterConfig {
                    peers_dns: Some("svc".into()),
                    ..ClusterConfig::from_flags(Some("http://a:1".into()), vec![])
                },
                "cluster.peers_dns",
            ),
            (
                ClusterConfig {
                    client_cert: Some("c.pem".into()),
                    ..ok.clone()
                },
                "cluster.client_cert",
            ),
        ];
        for (cfg, key) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        assert_eq!(split_host_port("svc.ns:5000").unwrap(), ("svc.ns", 5000));
    }
}
